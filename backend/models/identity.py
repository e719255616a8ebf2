"""Identity: users, workspaces and their members, sign-in codes, sessions, API keys,
invitations, and the activity log. Every token and code is stored only as a hash."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, Integer, String, UniqueConstraint, func, text
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import Base, RecordModel


class User(RecordModel):
    __tablename__ = "users"

    # Stored lower-cased by the service; unique so one address is one account.
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str | None] = mapped_column(String(200))
    avatar_url: Mapped[str | None] = mapped_column(String(2048))
    is_active: Mapped[bool] = mapped_column(server_default=text("true"))
    last_login_at: Mapped[datetime | None]


class Workspace(RecordModel):
    __tablename__ = "workspaces"

    name: Mapped[str] = mapped_column(String(200))
    slug: Mapped[str] = mapped_column(String(100), unique=True)
    settings: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    # The workspace created with an account at first sign-in.
    is_personal: Mapped[bool] = mapped_column(server_default=text("false"))


class WorkspaceMember(RecordModel):
    __tablename__ = "workspace_members"
    __table_args__ = (UniqueConstraint("workspace_id", "user_id"),)

    workspace_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    role: Mapped[str] = mapped_column(String(20))


class OtpCode(RecordModel):
    __tablename__ = "otp_codes"
    __table_args__ = (Index("ix_otp_codes_email_created_at", "email", "created_at"),)

    email: Mapped[str] = mapped_column(String(320))
    purpose: Mapped[str] = mapped_column(String(20))
    # HMAC of email and code under the server secret: a leaked table does not give
    # codes away, even though a 6-digit space is small.
    code_hash: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime]
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # Set when used, exhausted or superseded by a newer code: a dead code never works.
    consumed_at: Mapped[datetime | None]


class AuthSession(RecordModel):
    """One sign-in: the family of rotating refresh tokens, revocable as a whole."""

    __tablename__ = "sessions"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    # Hash of the one refresh token that may be used next. Presenting any earlier one
    # (already rotated) is reuse: the whole session is revoked.
    refresh_token_hash: Mapped[str] = mapped_column(String(64))
    # The token rotated last, for a short grace: two tabs refreshing at once (or a
    # retry after a lost answer) is not theft and must not end the session.
    previous_refresh_token_hash: Mapped[str | None] = mapped_column(String(64))
    rotated_at: Mapped[datetime | None]
    ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(512))
    last_activity_at: Mapped[datetime] = mapped_column(server_default=func.now())
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    revoked_reason: Mapped[str | None] = mapped_column(String(40))


class ApiKey(RecordModel):
    __tablename__ = "api_keys"

    workspace_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    created_by: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    # Shown in lists so people can tell keys apart; not enough to use the key.
    prefix: Mapped[str] = mapped_column(String(20))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    expires_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class Invitation(RecordModel):
    __tablename__ = "invitations"
    __table_args__ = (Index("ix_invitations_email", "email"),)

    workspace_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    email: Mapped[str] = mapped_column(String(320))
    role: Mapped[str] = mapped_column(String(20))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    invited_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    expires_at: Mapped[datetime]
    accepted_at: Mapped[datetime | None]


class ActivityLog(Base):
    """Who did what to which resource, from where. Append-only."""

    __tablename__ = "activity_log"
    __table_args__ = (
        Index("ix_activity_log_workspace_id_created_at", "workspace_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    # clock_timestamp, not now(): entries of one transaction keep their real order.
    created_at: Mapped[datetime] = mapped_column(server_default=func.clock_timestamp())
    # Nullable and not a foreign key: the trail outlives a deleted workspace or user.
    workspace_id: Mapped[uuid.UUID | None]
    user_id: Mapped[uuid.UUID | None]
    api_key_id: Mapped[uuid.UUID | None]
    action: Mapped[str] = mapped_column(String(80))
    resource_type: Mapped[str] = mapped_column(String(40))
    resource_id: Mapped[str | None] = mapped_column(String(64))
    ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(512))
    details: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
