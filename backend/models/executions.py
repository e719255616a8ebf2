"""Executions (runs of a pinned workflow version) and their node checkpoints."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import Base, RecordModel

# The statuses the state machines know (backend/executions/state.py); the database
# refuses anything else, so no code path can write a status the lifecycle never checked.
EXECUTION_STATUSES = ("pending", "running", "completed", "failed", "cancelled")
NODE_STATUSES = (
    "pending",
    "running",
    "retrying",
    "waiting",
    "completed",
    "failed",
    "skipped",
    "cancelled",
)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class WorkflowExecution(RecordModel):
    __tablename__ = "workflow_executions"
    __table_args__ = (
        UniqueConstraint("workspace_id", "idempotency_key"),
        # A schedule slot fires once, however many dispatchers saw it due.
        UniqueConstraint("trigger_id", "scheduled_for"),
        Index("ix_workflow_executions_workspace_id_created_at", "workspace_id", "created_at"),
        Index("ix_workflow_executions_workflow_id_created_at", "workflow_id", "created_at"),
        # The reaper's scan: unfinished runs by lease expiry.
        Index(
            "ix_workflow_executions_unfinished",
            "status",
            "lease_expires_at",
            postgresql_where=text("status IN ('pending', 'running')"),
        ),
        CheckConstraint(_one_of("status", EXECUTION_STATUSES), name="status"),
    )

    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    workflow_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workflows.id", ondelete="CASCADE"))
    # The version this run is pinned to: editing the workflow never changes it.
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), server_default=text("'pending'"))
    trigger_type: Mapped[str] = mapped_column(String(20))
    trigger_data: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    variables: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    output: Mapped[dict[str, Any] | None]
    error: Mapped[dict[str, Any] | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    parent_execution_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("workflow_executions.id", ondelete="SET NULL"), index=True
    )
    # The parent's node that started this run (sub_workflow) and how deep the chain of
    # parents goes: children are cancelled with their parent, and depth is capped.
    parent_node_id: Mapped[str | None] = mapped_column(String(200))
    depth: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # Set by retry: the run whose completed nodes this one reuses.
    retry_of: Mapped[uuid.UUID | None]
    created_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    # The trigger record that started this run (schedule, webhook, event) and, for a
    # schedule, the slot it fired for.
    trigger_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("triggers.id", ondelete="SET NULL")
    )
    scheduled_for: Mapped[datetime | None]
    # Lease: the worker that holds the run, until when. A second delivery of the same
    # message finds a live lease and does nothing.
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    # How many times a worker claimed this run: a cap stops a poison run from looping.
    deliveries: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # A retry wait parks the run until then (the worker slot is released meanwhile).
    resume_at: Mapped[datetime | None]
    cancel_requested_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    duration_ms: Mapped[float | None] = mapped_column(Float)
    input_tokens: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    output_tokens: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    cost_usd: Mapped[float] = mapped_column(Float, server_default=text("0"))


class NodeExecution(RecordModel):
    """One node's checkpoint in a run (one per for_each iteration)."""

    __tablename__ = "node_executions"
    __table_args__ = (
        UniqueConstraint("execution_id", "node_id", "iteration"),
        CheckConstraint(_one_of("status", NODE_STATUSES), name="status"),
    )

    execution_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workflow_executions.id", ondelete="CASCADE")
    )
    # A loop body's node is `<loop>.<node>`: two ids of up to 64 characters and a dot.
    node_id: Mapped[str] = mapped_column(String(200))
    iteration: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    status: Mapped[str] = mapped_column(String(20))
    # The branch a finished node took (if/switch/error), for the scheduler.
    branch: Mapped[str | None] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    input: Mapped[dict[str, Any] | None]
    # Any JSON value: an object, a list, a string, a number.
    output: Mapped[Any] = mapped_column(JSONB, nullable=True)
    error: Mapped[dict[str, Any] | None]
    next_attempt_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    duration_ms: Mapped[float | None] = mapped_column(Float)
    input_tokens: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    output_tokens: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    cost_usd: Mapped[float] = mapped_column(Float, server_default=text("0"))


class ExecutionEvent(Base):
    """An execution's event log, archived from the Redis stream when the run ends, so a
    client resuming after the stream expired still gets exactly the events it missed."""

    __tablename__ = "execution_events"

    execution_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workflow_executions.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    event: Mapped[dict[str, Any]]


class ExecutionTransition(Base):
    """A run's history: every status change of the run and of its nodes, who made it
    and why, written by the lifecycle in the same statement as the change itself."""

    __tablename__ = "execution_transitions"
    __table_args__ = (Index("ix_execution_transitions_execution_id_id", "execution_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    execution_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workflow_executions.id", ondelete="CASCADE")
    )
    # None for the run itself; `<loop>.<node>` with iteration > 0 for a loop body's node.
    node_id: Mapped[str | None] = mapped_column(String(200))
    iteration: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # None when the row was created in `to_status`.
    from_status: Mapped[str | None] = mapped_column(String(20))
    to_status: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str | None] = mapped_column(Text)
    # Who: a lease token (worker host:pid/nonce), `user:<id>`, `api_key:<id>`, `reaper`,
    # `trigger:<id>`.
    actor: Mapped[str | None] = mapped_column(String(200))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
