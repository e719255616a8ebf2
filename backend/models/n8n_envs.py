"""n8n fleets II: environments (an instance with a stage and policies), pipelines that
order them, immutable snapshots of workflow definitions, the baseline each environment's
workflow is compared with, and drift incidents.

Why an environment is its own table and not columns on `n8n_instances`: the policies are
a group of settings of their own (protection, approvers, hours, drift policy) with their
own audit trail and their own routes; keeping them apart leaves issue 17's instance CRUD
and sync untouched, makes "which instances are environments" one join (an instance that
is in no pipeline needs no policies), and gives promotions and deployments a stable
environment id to point at. It is 1:1 with the instance (`instance_id` unique) and goes
when the instance goes."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import RecordModel


class N8nEnvironment(RecordModel):
    __tablename__ = "n8n_environments"

    workspace_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    instance_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("n8n_instances.id", ondelete="CASCADE"), unique=True
    )
    # dev | staging | production | any custom name.
    stage: Mapped[str] = mapped_column(String(50))
    # No direct toggles or restores through us: changes arrive by promotion.
    protected: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # Promotions into it: {"min_approvals": n, "approver_ids": [...], "approver_min_role": r}.
    approvals: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    # {"timezone": "Europe/Berlin", "days": [0..6], "start": "09:00", "end": "17:00"} or {}.
    allowed_hours: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    # notify | accept | restore
    drift_policy: Mapped[str] = mapped_column(String(20), server_default=text("'notify'"))
    # When drift was last checked, and whether its baselines were ever taken (adopted).
    drift_checked_at: Mapped[datetime | None]
    baseline_adopted_at: Mapped[datetime | None]
    created_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )


class N8nPipeline(RecordModel):
    """Environments in promotion order (dev -> staging -> production)."""

    __tablename__ = "n8n_pipelines"
    __table_args__ = (UniqueConstraint("workspace_id", "name"),)

    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(Text, server_default=text("''"))
    # Ordered environment ids (strings); checked against the workspace on every write.
    environment_ids: Mapped[list[str]] = mapped_column(server_default=text("'[]'::jsonb"))
    created_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )


class N8nSnapshot(RecordModel):
    """An immutable, normalised copy of one n8n workflow's definition (see
    backend/n8n/snapshots.normalise) and the sha256 of its canonical JSON. Never
    updated: no route or function writes to a stored snapshot."""

    __tablename__ = "n8n_snapshots"
    __table_args__ = (
        Index("ix_n8n_snapshots_instance_workflow", "instance_id", "n8n_workflow_id", "created_at"),
    )

    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    instance_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("n8n_instances.id", ondelete="CASCADE")
    )
    n8n_workflow_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(500))
    # Whether the workflow was published (active) when taken; a restore keeps it so.
    active: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    definition: Mapped[dict[str, Any]] = mapped_column()
    digest: Mapped[str] = mapped_column(String(64), index=True)
    # manual | pre-promotion | nightly | pre-restore | drift | baseline
    reason: Mapped[str] = mapped_column(String(20))
    note: Mapped[str | None] = mapped_column(Text)
    by_user_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    # n8n's own version id when taken (informative; not part of the digest).
    n8n_version_id: Mapped[str | None] = mapped_column(String(64))
    node_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))


class N8nBaseline(RecordModel):
    """What an environment's workflow should look like: the last snapshot promoted or
    accepted there. Drift is any difference from it."""

    __tablename__ = "n8n_baselines"
    __table_args__ = (UniqueConstraint("instance_id", "n8n_workflow_id"),)

    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    instance_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("n8n_instances.id", ondelete="CASCADE")
    )
    n8n_workflow_id: Mapped[str] = mapped_column(String(64))
    snapshot_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("n8n_snapshots.id", ondelete="CASCADE"), index=True
    )


class N8nDriftIncident(RecordModel):
    """A workflow that differs from its baseline (changed), has none (added) or is gone
    (deleted). At most one unresolved incident per workflow: a further drift updates it."""

    __tablename__ = "n8n_drift_incidents"
    __table_args__ = (
        Index(
            "uq_n8n_drift_incidents_unresolved",
            "instance_id",
            "n8n_workflow_id",
            unique=True,
            postgresql_where=text("status IN ('open', 'acknowledged')"),
        ),
        Index("ix_n8n_drift_incidents_workspace_status", "workspace_id", "status", "created_at"),
    )

    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    environment_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("n8n_environments.id", ondelete="CASCADE"), index=True
    )
    instance_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("n8n_instances.id", ondelete="CASCADE")
    )
    n8n_workflow_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(500))
    # changed | added | deleted
    kind: Mapped[str] = mapped_column(String(10))
    # open | acknowledged | accepted | reverted | resolved (back to baseline by itself)
    status: Mapped[str] = mapped_column(String(20), server_default=text("'open'"))
    baseline_snapshot_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("n8n_snapshots.id", ondelete="SET NULL")
    )
    current_snapshot_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("n8n_snapshots.id", ondelete="SET NULL")
    )
    current_digest: Mapped[str | None] = mapped_column(String(64))
    diff: Mapped[list[dict[str, Any]]] = mapped_column(server_default=text("'[]'::jsonb"))
    detections: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    last_seen_at: Mapped[datetime | None]
    acknowledged_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    acknowledged_at: Mapped[datetime | None]
    resolved_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    resolved_at: Mapped[datetime | None]
    # How it ended: by whom or by which policy ("policy:accept", "policy:restore").
    resolution: Mapped[str | None] = mapped_column(String(50))
