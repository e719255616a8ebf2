"""Trigger records behind a workflow's trigger nodes, and workflow notifications."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import RecordModel


class Trigger(RecordModel):
    """One schedule, webhook or event trigger node of a workflow's current version.

    Kept in step with the workflow by `backend.triggers.service.sync` on every save and
    status change: `active` follows the workflow being published, `enabled` is the
    user's own switch. A trigger fires only when both hold.
    """

    __tablename__ = "triggers"
    __table_args__ = (
        UniqueConstraint("workflow_id", "node_id"),
        # The dispatcher's scan: due schedules only.
        Index(
            "ix_triggers_due",
            "next_run_at",
            postgresql_where=text("kind = 'schedule' AND enabled AND active"),
        ),
        # execution_finished's one query: who listens to this workflow's runs.
        Index(
            "ix_triggers_listeners",
            "source_workflow_id",
            postgresql_where=text("kind = 'event' AND enabled AND active"),
        ),
    )

    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    workflow_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workflows.id", ondelete="CASCADE"))
    node_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(20))
    # The node's validated config as saved (cron, timezone, misfire, on, ...).
    config: Mapped[dict[str, Any]]
    enabled: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    active: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # Schedules: the next slot to fire (UTC) and the last one fired.
    next_run_at: Mapped[datetime | None]
    last_fired_at: Mapped[datetime | None]
    # Webhooks: the unguessable path segment of /api/v1/hooks/{token}, and the signing
    # secret (SecretBox-sealed; shown once, when set or rotated).
    token: Mapped[str | None] = mapped_column(String(100), unique=True)
    secret_encrypted: Mapped[str | None] = mapped_column(Text)
    # Events: the workflow whose runs start this one.
    source_workflow_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("workflows.id", ondelete="CASCADE")
    )


class NotificationSecret(RecordModel):
    """The key a workflow's outgoing notification webhooks are signed with (sealed)."""

    __tablename__ = "notification_secrets"

    workflow_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workflows.id", ondelete="CASCADE"), unique=True
    )
    secret_encrypted: Mapped[str] = mapped_column(Text)


class Notification(RecordModel):
    """One notification of one run's outcome to one target, with its delivery record."""

    __tablename__ = "notifications"
    __table_args__ = (
        # A run notifies each target once, however often its end is processed.
        UniqueConstraint("execution_id", "channel", "target"),
        Index("ix_notifications_workflow_id_created_at", "workflow_id", "created_at"),
    )

    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    workflow_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workflows.id", ondelete="CASCADE"))
    execution_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workflow_executions.id", ondelete="CASCADE")
    )
    event: Mapped[str] = mapped_column(String(20))
    channel: Mapped[str] = mapped_column(String(20))
    # An email address or a URL.
    target: Mapped[str] = mapped_column(String(2000))
    status: Mapped[str] = mapped_column(String(20), server_default=text("'pending'"))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None]
