"""Workflows and their immutable versions, agents, and encrypted credentials."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import RecordModel


class Workflow(RecordModel):
    __tablename__ = "workflows"
    __table_args__ = (
        Index("ix_workflows_tags", "tags", postgresql_using="gin"),
        Index("ix_workflows_workspace_id_updated_at", "workspace_id", "updated_at"),
    )

    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, server_default=text("''"))
    status: Mapped[str] = mapped_column(String(20), server_default=text("'draft'"))
    tags: Mapped[list[str]] = mapped_column(ARRAY(String(50)), server_default=text("'{}'"))
    # The version executions pin when they start; saving makes a new one.
    current_version: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    created_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )


class WorkflowVersion(RecordModel):
    """Never updated: a run pinned to a version sees exactly what was saved."""

    __tablename__ = "workflow_versions"
    __table_args__ = (UniqueConstraint("workflow_id", "number"),)

    workflow_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workflows.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    definition: Mapped[dict[str, Any]]
    created_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )


class Agent(RecordModel):
    __tablename__ = "agents"

    workspace_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, server_default=text("''"))
    system_prompt: Mapped[str] = mapped_column(Text, server_default=text("''"))
    model: Mapped[str] = mapped_column(String(100))
    temperature: Mapped[float | None]
    max_tokens: Mapped[int] = mapped_column(Integer)
    tools: Mapped[list[dict[str, Any]]] = mapped_column(server_default=text("'[]'::jsonb"))
    permissions: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    memory: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    sub_agents: Mapped[list[str]] = mapped_column(server_default=text("'[]'::jsonb"))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", server_default=text("'{}'::jsonb"))
    created_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )


class Credential(RecordModel):
    __tablename__ = "credentials"
    __table_args__ = (UniqueConstraint("workspace_id", "name"),)

    workspace_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(100))
    type: Mapped[str] = mapped_column(String(30))
    # Fernet token of the JSON secret fields; bound to this row by id and workspace
    # inside the plaintext, so a ciphertext copied to another row does not decrypt there.
    secret_encrypted: Mapped[str] = mapped_column(Text)
    # The last few characters of one secret value, so people can tell keys apart.
    hint: Mapped[str | None] = mapped_column(String(12))
    last_used_at: Mapped[datetime | None]
    created_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
