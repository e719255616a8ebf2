"""n8n fleets II: environments, pipelines, snapshots, baselines, drift incidents.

Revision ID: f1a7c3e9b2d4
Revises: c3e8a5d1f7b9
Create Date: 2026-12-03 10:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "f1a7c3e9b2d4"
down_revision: str | None = "c3e8a5d1f7b9"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONB_ARRAY = sa.text("'[]'::jsonb")
JSONB_OBJECT = sa.text("'{}'::jsonb")


def _stamps() -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    ]  # fmt: skip


def _fk(table: str, column: str, target: str, ondelete: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column], [f"{target}.id"], name=op.f(f"fk_{table}_{column}_{target}"), ondelete=ondelete
    )


def _ts(name: str) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), nullable=True)


def upgrade() -> None:
    op.create_table(
        "n8n_environments",
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("instance_id", sa.Uuid(), nullable=False),
        sa.Column("stage", sa.String(50), nullable=False),
        sa.Column("protected", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("approvals", postgresql.JSONB(), server_default=JSONB_OBJECT, nullable=False),
        sa.Column("allowed_hours", postgresql.JSONB(), server_default=JSONB_OBJECT, nullable=False),
        sa.Column(
            "drift_policy", sa.String(20), server_default=sa.text("'notify'"), nullable=False
        ),
        _ts("drift_checked_at"),
        _ts("baseline_adopted_at"),
        sa.Column("created_by", sa.Uuid(), nullable=True),
        *_stamps(),
        _fk("n8n_environments", "workspace_id", "workspaces", "CASCADE"),
        _fk("n8n_environments", "instance_id", "n8n_instances", "CASCADE"),
        _fk("n8n_environments", "created_by", "users", "SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_n8n_environments")),
        sa.UniqueConstraint("instance_id", name=op.f("uq_n8n_environments_instance_id")),
    )
    op.create_index(op.f("ix_n8n_environments_workspace_id"), "n8n_environments", ["workspace_id"])

    op.create_table(
        "n8n_pipelines",
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("description", sa.Text(), server_default=sa.text("''"), nullable=False),
        sa.Column(
            "environment_ids", postgresql.JSONB(), server_default=JSONB_ARRAY, nullable=False
        ),
        sa.Column("created_by", sa.Uuid(), nullable=True),
        *_stamps(),
        _fk("n8n_pipelines", "workspace_id", "workspaces", "CASCADE"),
        _fk("n8n_pipelines", "created_by", "users", "SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_n8n_pipelines")),
        sa.UniqueConstraint(
            "workspace_id", "name", name=op.f("uq_n8n_pipelines_workspace_id_name")
        ),
    )

    op.create_table(
        "n8n_snapshots",
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("instance_id", sa.Uuid(), nullable=False),
        sa.Column("n8n_workflow_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(500), nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("definition", postgresql.JSONB(), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(20), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("by_user_id", sa.Uuid(), nullable=True),
        sa.Column("n8n_version_id", sa.String(64), nullable=True),
        sa.Column("node_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        *_stamps(),
        _fk("n8n_snapshots", "workspace_id", "workspaces", "CASCADE"),
        _fk("n8n_snapshots", "instance_id", "n8n_instances", "CASCADE"),
        _fk("n8n_snapshots", "by_user_id", "users", "SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_n8n_snapshots")),
    )
    op.create_index(
        "ix_n8n_snapshots_instance_workflow",
        "n8n_snapshots",
        ["instance_id", "n8n_workflow_id", "created_at"],
    )
    op.create_index(op.f("ix_n8n_snapshots_digest"), "n8n_snapshots", ["digest"])

    op.create_table(
        "n8n_baselines",
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("instance_id", sa.Uuid(), nullable=False),
        sa.Column("n8n_workflow_id", sa.String(64), nullable=False),
        sa.Column("snapshot_id", sa.Uuid(), nullable=False),
        *_stamps(),
        _fk("n8n_baselines", "workspace_id", "workspaces", "CASCADE"),
        _fk("n8n_baselines", "instance_id", "n8n_instances", "CASCADE"),
        _fk("n8n_baselines", "snapshot_id", "n8n_snapshots", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_n8n_baselines")),
        sa.UniqueConstraint(
            "instance_id",
            "n8n_workflow_id",
            name=op.f("uq_n8n_baselines_instance_id_n8n_workflow_id"),
        ),
    )
    op.create_index(op.f("ix_n8n_baselines_snapshot_id"), "n8n_baselines", ["snapshot_id"])

    op.create_table(
        "n8n_drift_incidents",
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("environment_id", sa.Uuid(), nullable=False),
        sa.Column("instance_id", sa.Uuid(), nullable=False),
        sa.Column("n8n_workflow_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(500), nullable=False),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("status", sa.String(20), server_default=sa.text("'open'"), nullable=False),
        sa.Column("baseline_snapshot_id", sa.Uuid(), nullable=True),
        sa.Column("current_snapshot_id", sa.Uuid(), nullable=True),
        sa.Column("current_digest", sa.String(64), nullable=True),
        sa.Column("diff", postgresql.JSONB(), server_default=JSONB_ARRAY, nullable=False),
        sa.Column("detections", sa.Integer(), server_default=sa.text("1"), nullable=False),
        _ts("last_seen_at"),
        sa.Column("acknowledged_by", sa.Uuid(), nullable=True),
        _ts("acknowledged_at"),
        sa.Column("resolved_by", sa.Uuid(), nullable=True),
        _ts("resolved_at"),
        sa.Column("resolution", sa.String(50), nullable=True),
        *_stamps(),
        _fk("n8n_drift_incidents", "workspace_id", "workspaces", "CASCADE"),
        _fk("n8n_drift_incidents", "environment_id", "n8n_environments", "CASCADE"),
        _fk("n8n_drift_incidents", "instance_id", "n8n_instances", "CASCADE"),
        _fk("n8n_drift_incidents", "baseline_snapshot_id", "n8n_snapshots", "SET NULL"),
        _fk("n8n_drift_incidents", "current_snapshot_id", "n8n_snapshots", "SET NULL"),
        _fk("n8n_drift_incidents", "acknowledged_by", "users", "SET NULL"),
        _fk("n8n_drift_incidents", "resolved_by", "users", "SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_n8n_drift_incidents")),
    )
    op.create_index(
        "uq_n8n_drift_incidents_unresolved",
        "n8n_drift_incidents",
        ["instance_id", "n8n_workflow_id"],
        unique=True,
        postgresql_where=sa.text("status IN ('open', 'acknowledged')"),
    )
    op.create_index(
        "ix_n8n_drift_incidents_workspace_status",
        "n8n_drift_incidents",
        ["workspace_id", "status", "created_at"],
    )
    op.create_index(
        op.f("ix_n8n_drift_incidents_environment_id"), "n8n_drift_incidents", ["environment_id"]
    )


def downgrade() -> None:
    op.drop_table("n8n_drift_incidents")
    op.drop_table("n8n_baselines")
    op.drop_table("n8n_snapshots")
    op.drop_table("n8n_pipelines")
    op.drop_table("n8n_environments")
