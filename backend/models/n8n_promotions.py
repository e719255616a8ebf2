"""n8n promotions: the stable id that follows a workflow from environment to environment
(its lineage), promotion plans (what will be written where, the credential mapping, the
diff and the gates), and the deployments that carried them out."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, ForeignKey, Index, String, Text, UniqueConstraint, Uuid, text
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import RecordModel


class N8nLineage(RecordModel):
    """One workflow's membership of a lineage: "the same workflow" on several instances.
    The lineage id is ours (n8n ids differ per instance); a promotion that creates the
    target adds it to the source's lineage. One workflow per lineage per instance."""

    __tablename__ = "n8n_lineages"
    __table_args__ = (
        UniqueConstraint("instance_id", "n8n_workflow_id"),
        UniqueConstraint("lineage_id", "instance_id"),
    )

    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    lineage_id: Mapped[uuid.UUID] = mapped_column(Uuid(), index=True)
    instance_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("n8n_instances.id", ondelete="CASCADE")
    )
    n8n_workflow_id: Mapped[str] = mapped_column(String(64))


class N8nPromotion(RecordModel):
    """A plan to copy one workflow from one environment to the next, and its fate.

    status: awaiting_approval | approved | rejected | blocked (credentials missing) |
    executing | deployed | rolled_back | failed. `body` is exactly what will be written
    (credential ids already the target's, the lineage marker in its settings) and
    `digest` the normalised hash a read-back must match."""

    __tablename__ = "n8n_promotions"
    __table_args__ = (
        Index("ix_n8n_promotions_workspace_id_created_at", "workspace_id", "created_at"),
    )

    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    lineage_id: Mapped[uuid.UUID] = mapped_column(Uuid(), index=True)
    from_env_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("n8n_environments.id", ondelete="CASCADE")
    )
    to_env_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("n8n_environments.id", ondelete="CASCADE"), index=True
    )
    source_instance_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("n8n_instances.id", ondelete="CASCADE")
    )
    source_workflow_id: Mapped[str] = mapped_column(String(64))
    source_active: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    target_instance_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("n8n_instances.id", ondelete="CASCADE")
    )
    # None until a create has run.
    target_workflow_id: Mapped[str | None] = mapped_column(String(64))
    # create | update
    action: Mapped[str] = mapped_column(String(10))
    # How the target was recognised: lineage | marker | none.
    matched_by: Mapped[str] = mapped_column(String(10))
    name: Mapped[str] = mapped_column(String(500))
    status: Mapped[str] = mapped_column(String(20))
    # {credentials: {mapped, missing}, diff, gates, target_digest, approvals}.
    plan: Mapped[dict[str, Any]] = mapped_column()
    body: Mapped[dict[str, Any]] = mapped_column()
    digest: Mapped[str] = mapped_column(String(64))
    min_success_rate: Mapped[float | None]
    task_ids: Mapped[list[str]] = mapped_column(server_default=text("'[]'::jsonb"))
    requested_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    # Who approved (distinct people), who rejected and why.
    approved_by: Mapped[list[str]] = mapped_column(server_default=text("'[]'::jsonb"))
    rejected_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    decision_comment: Mapped[str | None] = mapped_column(Text)
    executed_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    executed_at: Mapped[datetime | None]
    deployment_id: Mapped[uuid.UUID | None] = mapped_column(Uuid())


class N8nDeployment(RecordModel):
    """What one executed promotion did to an environment, step by step, and how it ended:
    deployed, rolled_back (a step failed; the target is as it was) or failed (a step
    failed and so did the rollback: look at `steps`)."""

    __tablename__ = "n8n_deployments"
    __table_args__ = (
        Index("ix_n8n_deployments_environment_created_at", "environment_id", "created_at"),
    )

    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    promotion_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("n8n_promotions.id", ondelete="CASCADE"), unique=True
    )
    environment_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("n8n_environments.id", ondelete="CASCADE")
    )
    from_env_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("n8n_environments.id", ondelete="SET NULL")
    )
    instance_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("n8n_instances.id", ondelete="CASCADE")
    )
    lineage_id: Mapped[uuid.UUID] = mapped_column(Uuid())
    n8n_workflow_id: Mapped[str | None] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(500))
    action: Mapped[str] = mapped_column(String(10))
    status: Mapped[str] = mapped_column(String(20))
    # [{step, ok, at, detail}]: snapshot, write, publish, verify, baseline, rollback.
    steps: Mapped[list[dict[str, Any]]] = mapped_column(server_default=text("'[]'::jsonb"))
    pre_snapshot_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("n8n_snapshots.id", ondelete="SET NULL")
    )
    snapshot_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("n8n_snapshots.id", ondelete="SET NULL")
    )
    digest: Mapped[str] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    rolled_back: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    by_user_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
