"""People in the loop: tasks (approvals a run waits for, and manual to-dos), the one-time
links that decide a task or resume a waiting run, a person's notifications, their
preferences, the workflows they watch, and their push subscriptions (Web Push, FCM)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import RecordModel

TASK_STATUSES = ("open", "approved", "rejected", "expired", "cancelled")


class Task(RecordModel):
    """Something a person decides: an `approval` a run parked on (execution_id/node_id
    set), or a `manual` task someone filed. Decided once: the decision columns are
    written by the one statement that moves an open task on."""

    __tablename__ = "tasks"
    __table_args__ = (
        # One task per approval node execution, however often its node runs again.
        UniqueConstraint("execution_id", "node_id", "iteration"),
        Index("ix_tasks_workspace_id_status_created_at", "workspace_id", "status", "created_at"),
        # The expiry pass: open tasks by deadline.
        Index("ix_tasks_open_expiry", "expires_at", postgresql_where=text("status = 'open'")),
        CheckConstraint(
            "status IN ('open', 'approved', 'rejected', 'expired', 'cancelled')", name="status"
        ),
    )

    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), server_default=text("'open'"))
    title: Mapped[str] = mapped_column(String(500))
    message: Mapped[str] = mapped_column(Text, server_default=text("''"))
    # What the person reviews (any JSON), and the JSON Schema their input must meet.
    data: Mapped[Any] = mapped_column(JSONB, nullable=True)
    form: Mapped[dict[str, Any] | None]
    # Who may act: these people, and/or members of at least this role. Neither set:
    # the members who may execute the workflow (editor and up).
    assignee_ids: Mapped[list[uuid.UUID]] = mapped_column(
        ARRAY(Uuid()), server_default=text("'{}'::uuid[]")
    )
    min_role: Mapped[str | None] = mapped_column(String(20))
    claimed_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    claimed_at: Mapped[datetime | None]
    execution_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("workflow_executions.id", ondelete="CASCADE")
    )
    workflow_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("workflows.id", ondelete="CASCADE"), index=True
    )
    node_id: Mapped[str | None] = mapped_column(String(200))
    iteration: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    expires_at: Mapped[datetime | None]
    # What expiry decides: reject, approve or fail (the node fails).
    on_timeout: Mapped[str] = mapped_column(String(10), server_default=text("'reject'"))
    decided_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    decided_at: Mapped[datetime | None]
    # {decision, by, at, comment, input, via}: the approval node's output.
    decision: Mapped[dict[str, Any] | None]
    created_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )


class ActionLink(RecordModel):
    """A one-time link: `decide` (a task, by one person, from an e-mail, without signing
    in) or `resume` (a waiting run's node, by whoever holds the URL). The token carries
    an HMAC over the row's bindings; `used_at` makes it single use."""

    __tablename__ = "action_links"
    __table_args__ = (UniqueConstraint("execution_id", "node_id", "iteration", "purpose"),)

    purpose: Mapped[str] = mapped_column(String(20))
    task_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    execution_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("workflow_executions.id", ondelete="CASCADE")
    )
    node_id: Mapped[str | None] = mapped_column(String(200))
    iteration: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    expires_at: Mapped[datetime | None]
    used_at: Mapped[datetime | None]
    # A resume call's JSON body (the wait node's output).
    body: Mapped[Any] = mapped_column(JSONB, nullable=True)


class UserNotification(RecordModel):
    """One notice in a person's inbox (a task for them, a run that failed, ...)."""

    __tablename__ = "user_notifications"
    __table_args__ = (Index("ix_user_notifications_user_id_created_at", "user_id", "created_at"),)

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    workspace_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE")
    )
    kind: Mapped[str] = mapped_column(String(40))
    title: Mapped[str] = mapped_column(String(500))
    body: Mapped[str] = mapped_column(Text, server_default=text("''"))
    data: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    read_at: Mapped[datetime | None]


class NotificationPreference(RecordModel):
    """A person's switches: {kind: {channel: bool}}; what is not said is on."""

    __tablename__ = "notification_preferences"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), unique=True
    )
    preferences: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))


class WorkflowWatch(RecordModel):
    """A person who hears about a workflow's failed runs without owning it."""

    __tablename__ = "workflow_watches"
    __table_args__ = (UniqueConstraint("workflow_id", "user_id"),)

    workflow_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workflows.id", ondelete="CASCADE"))
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )


class PushSubscription(RecordModel):
    """A device that receives a person's pushes: a browser's Web Push subscription
    (endpoint and keys) or a mobile app's FCM registration token. The address is sealed
    (it is a capability to push to that device); its hash keeps one row per device."""

    __tablename__ = "push_subscriptions"
    __table_args__ = (UniqueConstraint("user_id", "address_hash"),)

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(20))
    address_hash: Mapped[str] = mapped_column(String(64))
    secret_encrypted: Mapped[str] = mapped_column(Text)
    label: Mapped[str | None] = mapped_column(String(200))
    # Where it goes, without the secret part (shown in lists): the endpoint's origin.
    origin: Mapped[str | None] = mapped_column(String(300))
    last_sent_at: Mapped[datetime | None]
