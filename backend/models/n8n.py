"""n8n fleets: connected n8n instances, the workflows and executions synced from them,
the failures their error workflows report to us, and who watches them."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import RecordModel


class N8nInstance(RecordModel):
    """One n8n server a workspace connected. The API key (and the intake token and the
    notification signing secret) are sealed together in `secrets_encrypted`, bound to
    the row; only the intake token's hash is stored in the clear, for the lookup."""

    __tablename__ = "n8n_instances"
    __table_args__ = (
        UniqueConstraint("workspace_id", "name"),
        # The beat pass: instances whose sync is due, oldest first.
        Index("ix_n8n_instances_sync_due", "last_synced_at", postgresql_where=text("enabled")),
    )

    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    # Where n8n answers, without /api/v1 (the client adds it); never holds credentials.
    base_url: Mapped[str] = mapped_column(String(2000))
    environment: Mapped[str] = mapped_column(String(50), server_default=text("'production'"))
    tags: Mapped[list[str]] = mapped_column(server_default=text("'[]'::jsonb"))
    secrets_encrypted: Mapped[str] = mapped_column(Text)
    intake_token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The user's switch: a disabled instance is not synced by beat.
    enabled: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    # unknown | ok | unauthorized | unreachable | error
    status: Mapped[str] = mapped_column(String(20), server_default=text("'unknown'"))
    status_reason: Mapped[str | None] = mapped_column(Text)
    n8n_version: Mapped[str | None] = mapped_column(String(50))
    # What the key was seen to be allowed: {"workflow:list": true, ...}.
    capabilities: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    last_checked_at: Mapped[datetime | None]
    last_synced_at: Mapped[datetime | None]
    sync_error: Mapped[str | None] = mapped_column(Text)
    # A sync holds the instance until this time (two beats, or beat and a refresh, never
    # sync one instance at once); a crashed sync's claim simply runs out.
    sync_claimed_until: Mapped[datetime | None]
    # Executions are fetched from here on (startedAfter), moved forward by each sync.
    executions_after: Mapped[datetime | None]
    # The error workflow installed on the instance (its n8n id), and where it posts.
    error_workflow_id: Mapped[str | None] = mapped_column(String(64))
    # Who else hears of failures: {"emails": [...], "webhooks": [...]}.
    notify: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    created_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )


class N8nWorkflow(RecordModel):
    """A workflow as last seen on its instance."""

    __tablename__ = "n8n_workflows"
    __table_args__ = (UniqueConstraint("instance_id", "n8n_id"),)

    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    instance_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("n8n_instances.id", ondelete="CASCADE")
    )
    n8n_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(500))
    active: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    archived: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    tags: Mapped[list[str]] = mapped_column(server_default=text("'[]'::jsonb"))
    version_id: Mapped[str | None] = mapped_column(String(64))
    node_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # The n8n definition: {nodes, connections, settings} (pinned data left out).
    definition: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    error_workflow: Mapped[str | None] = mapped_column(String(64))
    n8n_created_at: Mapped[datetime | None]
    n8n_updated_at: Mapped[datetime | None]
    synced_at: Mapped[datetime | None]


class N8nExecution(RecordModel):
    """An execution as last seen on its instance (or as its error workflow told us)."""

    __tablename__ = "n8n_executions"
    __table_args__ = (
        UniqueConstraint("instance_id", "n8n_id"),
        Index("ix_n8n_executions_instance_id_started_at", "instance_id", "started_at"),
    )

    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    instance_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("n8n_instances.id", ondelete="CASCADE")
    )
    n8n_id: Mapped[str] = mapped_column(String(64))
    workflow_n8n_id: Mapped[str | None] = mapped_column(String(64))
    workflow_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("n8n_workflows.id", ondelete="SET NULL"), index=True
    )
    status: Mapped[str] = mapped_column(String(20))
    mode: Mapped[str | None] = mapped_column(String(30))
    finished: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    started_at: Mapped[datetime | None]
    stopped_at: Mapped[datetime | None]
    retry_of: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    failed_node: Mapped[str | None] = mapped_column(String(500))


class N8nError(RecordModel):
    """A failure an instance's error workflow reported, once per execution (or per
    trigger failure), linked to the synced workflow when we know it."""

    __tablename__ = "n8n_errors"
    __table_args__ = (
        UniqueConstraint("instance_id", "dedupe_key"),
        Index("ix_n8n_errors_instance_id_created_at", "instance_id", "created_at"),
    )

    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    instance_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("n8n_instances.id", ondelete="CASCADE")
    )
    # "execution:<id>", or "trigger:<workflow>:<sha256 of the message>" when the
    # trigger itself failed and there is no execution.
    dedupe_key: Mapped[str] = mapped_column(String(200))
    execution_n8n_id: Mapped[str | None] = mapped_column(String(64))
    workflow_n8n_id: Mapped[str | None] = mapped_column(String(64))
    workflow_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("n8n_workflows.id", ondelete="SET NULL")
    )
    workflow_name: Mapped[str | None] = mapped_column(String(500))
    node: Mapped[str | None] = mapped_column(String(500))
    message: Mapped[str] = mapped_column(Text, server_default=text("''"))
    url: Mapped[str | None] = mapped_column(String(2000))
    mode: Mapped[str | None] = mapped_column(String(30))
    # How many times the error workflow reported it (a retry of the HTTP node, say).
    reports: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    # Whom it was sent to: {"users": [...], "emails": [...], "webhooks": [...]}.
    notified: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))


class N8nWatch(RecordModel):
    """A person who hears about an instance's failures: of one workflow (`workflow_n8n_id`)
    or of all of them ('')."""

    __tablename__ = "n8n_watches"
    __table_args__ = (UniqueConstraint("instance_id", "user_id", "workflow_n8n_id"),)

    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    instance_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("n8n_instances.id", ondelete="CASCADE")
    )
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    workflow_n8n_id: Mapped[str] = mapped_column(String(64), server_default=text("''"))
