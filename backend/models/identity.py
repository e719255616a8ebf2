"""Users and workspaces: the anchor every other table is scoped to.

Deliberately minimal here; the identity domain adds sessions, memberships and roles.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import String, text
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import RecordModel


class User(RecordModel):
    __tablename__ = "users"

    # Stored lower-cased by the service; unique so one address is one account.
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str | None] = mapped_column(String(200))
    avatar_url: Mapped[str | None] = mapped_column(String(2048))
    is_active: Mapped[bool] = mapped_column(server_default=text("true"))


class Workspace(RecordModel):
    __tablename__ = "workspaces"

    name: Mapped[str] = mapped_column(String(200))
    slug: Mapped[str] = mapped_column(String(100), unique=True)
    settings: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
