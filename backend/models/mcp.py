"""MCP servers and the tools discovered on them, uploaded files, and the usage of the
tools API (tokens, cost) kept for analytics."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import RecordModel


class McpServer(RecordModel):
    __tablename__ = "mcp_servers"
    __table_args__ = (UniqueConstraint("workspace_id", "name"),)

    workspace_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(Text, server_default=text("''"))
    transport: Mapped[str] = mapped_column(String(20))
    # HTTP transports only; never holds credentials (userinfo is refused at input).
    url: Mapped[str | None] = mapped_column(String(2000))
    # stdio only: the name of an operator-listed command (settings), never a command line.
    command: Mapped[str | None] = mapped_column(String(100))
    timeout_s: Mapped[float | None]
    # Headers (HTTP) and env values (stdio), sealed like credentials; only their names
    # are shown.
    secrets_encrypted: Mapped[str | None] = mapped_column(Text)
    header_names: Mapped[list[str]] = mapped_column(server_default=text("'[]'::jsonb"))
    env_names: Mapped[list[str]] = mapped_column(server_default=text("'[]'::jsonb"))
    # disconnected | connected | error
    status: Mapped[str] = mapped_column(String(20), server_default=text("'disconnected'"))
    status_reason: Mapped[str | None] = mapped_column(Text)
    last_connected_at: Mapped[datetime | None]
    server_info: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    created_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )


class McpTool(RecordModel):
    """A tool as discovered, with the hash of what was approved. A rediscovered tool
    whose description or schema differs from the approved hash is `changed` and is not
    offered to agents or nodes until re-approved (tool poisoning, rug pulls)."""

    __tablename__ = "mcp_tools"
    __table_args__ = (UniqueConstraint("server_id", "name"),)

    server_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("mcp_servers.id", ondelete="CASCADE"), index=True
    )
    workspace_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, server_default=text("''"))
    input_schema: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    # sha256 of the canonical JSON of {name, description, input_schema} as last seen.
    hash: Mapped[str] = mapped_column(String(64))
    approved_hash: Mapped[str | None] = mapped_column(String(64))
    # approved | changed | removed (no longer listed by the server)
    status: Mapped[str] = mapped_column(String(20), server_default=text("'approved'"))
    previous: Mapped[dict[str, Any] | None] = mapped_column()
    approved_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    approved_at: Mapped[datetime | None]
    last_seen_at: Mapped[datetime | None]


class File(RecordModel):
    """An uploaded file: metadata here, bytes in the workspace's storage under
    `storage_key` (a path within the workspace's area)."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_workspace_id_created_at", "workspace_id", "created_at"),)

    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    uploaded_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    name: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(500))


class ToolUsage(RecordModel):
    """One call of the tools API (chat, web read, search, image): who, what, tokens and
    an estimated cost, for analytics."""

    __tablename__ = "tool_usage"
    __table_args__ = (Index("ix_tool_usage_workspace_id_created_at", "workspace_id", "created_at"),)

    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    tool: Mapped[str] = mapped_column(String(50))
    model: Mapped[str | None] = mapped_column(String(100))
    input_tokens: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    output_tokens: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    cost_usd: Mapped[float | None]
    ok: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
