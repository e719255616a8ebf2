"""Precomputed analytics: one row per workspace, hour (and day), dimension and key,
rebuilt from the runs by `analytics.aggregate`, so the analytics API never scans a month
of runs; and each workspace's quota overrides."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Float, ForeignKey, Index, Integer, String, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import Base
from backend.models.executions import WorkflowExecution

# The dimensions a row can be about, and what its key is:
#   workspace  ""                 every run of the hour
#   workflow   workflow id        that workflow's runs
#   node_type  trigger|agent|...  node attempts of that type
#   model      model name         agent nodes that called that model
#   agent      agent id           agent nodes that used that agent
#   failure    <workflow>/<node>/<error class>   failed node attempts
AGGREGATE_KINDS = ("workspace", "workflow", "node_type", "model", "agent", "failure")


class AnalyticsAggregate(Base):
    __tablename__ = "analytics_aggregates"

    workspace_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), primary_key=True
    )
    # "hour": the runs created in that hour; "day": the sum of that day's hour rows,
    # rebuilt with them, so a month is read as ~30 rows per key instead of ~720.
    span: Mapped[str] = mapped_column(String(5), primary_key=True, server_default="hour")
    # The hour (or day) the runs were created in (UTC); weeks and months are sums.
    bucket: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    kind: Mapped[str] = mapped_column(String(20), primary_key=True)
    key: Mapped[str] = mapped_column(String(400), primary_key=True)
    runs: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    pending: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    running: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    completed: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    failed: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    cancelled: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # Durations (ms) of finished runs or node attempts, and queue waits (created ->
    # claimed): sums for means, log-scale histograms ({bucket index: count}) for
    # percentiles that can be added across hours.
    duration_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    duration_sum_ms: Mapped[float] = mapped_column(Float, server_default=text("0"))
    duration_hist: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    wait_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    wait_sum_ms: Mapped[float] = mapped_column(Float, server_default=text("0"))
    wait_hist: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    # The row's own percentiles (ms) of its histograms, written with it: a series point
    # that is one row (an hour, a day) is read without its histogram.
    duration_p50: Mapped[float | None] = mapped_column(Float)
    duration_p95: Mapped[float | None] = mapped_column(Float)
    duration_p99: Mapped[float | None] = mapped_column(Float)
    wait_p50: Mapped[float | None] = mapped_column(Float)
    wait_p95: Mapped[float | None] = mapped_column(Float)
    wait_p99: Mapped[float | None] = mapped_column(Float)
    retries: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    input_tokens: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    output_tokens: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    cache_read_tokens: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    cache_write_tokens: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    cost_usd: Mapped[float] = mapped_column(Float, server_default=text("0"))
    computed_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


class AnalyticsCursor(Base):
    """How far `analytics.aggregate` has folded changes in (one row per cursor name):
    the next pass rebuilds every hour holding a run created or finished since."""

    __tablename__ = "analytics_cursors"

    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    position: Mapped[datetime] = mapped_column(DateTime(timezone=True))


# What changed since a cursor: a run created (pending) or finished since then. One
# expression index serves both, so the pass never scans the table. Declared here, with
# the analytics that need it, rather than on the executions model.
CHANGED_AT = func.coalesce(WorkflowExecution.finished_at, WorkflowExecution.created_at)
Index("ix_workflow_executions_changed_at", CHANGED_AT)


class WorkspaceQuota(Base):
    """An operator's per-workspace quota overrides (`python -m backend.quotas set`):
    {quota name: limit or null (unlimited)}; a name absent here takes QUOTAS__* from
    settings. Kept apart from `workspaces.settings`, which the workspace's own
    administrators may edit: a tenant never lifts its own quota."""

    __tablename__ = "workspace_quotas"

    workspace_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), primary_key=True
    )
    limits: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )
