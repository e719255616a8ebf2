"""n8n promotions: lineages, promotion plans, deployments.

Revision ID: a9d3e5b7c1f2
Revises: f1a7c3e9b2d4
Create Date: 2026-12-03 11:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "a9d3e5b7c1f2"
down_revision: str | None = "f1a7c3e9b2d4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONB_ARRAY = sa.text("'[]'::jsonb")


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
        "n8n_lineages",
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("lineage_id", sa.Uuid(), nullable=False),
        sa.Column("instance_id", sa.Uuid(), nullable=False),
        sa.Column("n8n_workflow_id", sa.String(64), nullable=False),
        *_stamps(),
        _fk("n8n_lineages", "workspace_id", "workspaces", "CASCADE"),
        _fk("n8n_lineages", "instance_id", "n8n_instances", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_n8n_lineages")),
        sa.UniqueConstraint(
            "instance_id", "n8n_workflow_id", name=op.f("uq_n8n_lineages_instance_id_n8n_workflow_id")
        ),
        sa.UniqueConstraint(
            "lineage_id", "instance_id", name=op.f("uq_n8n_lineages_lineage_id_instance_id")
        ),
    )  # fmt: skip
    op.create_index(op.f("ix_n8n_lineages_lineage_id"), "n8n_lineages", ["lineage_id"])

    op.create_table(
        "n8n_promotions",
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("lineage_id", sa.Uuid(), nullable=False),
        sa.Column("from_env_id", sa.Uuid(), nullable=False),
        sa.Column("to_env_id", sa.Uuid(), nullable=False),
        sa.Column("source_instance_id", sa.Uuid(), nullable=False),
        sa.Column("source_workflow_id", sa.String(64), nullable=False),
        sa.Column("source_active", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("target_instance_id", sa.Uuid(), nullable=False),
        sa.Column("target_workflow_id", sa.String(64), nullable=True),
        sa.Column("action", sa.String(10), nullable=False),
        sa.Column("matched_by", sa.String(10), nullable=False),
        sa.Column("name", sa.String(500), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("plan", postgresql.JSONB(), nullable=False),
        sa.Column("body", postgresql.JSONB(), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("min_success_rate", sa.Float(), nullable=True),
        sa.Column("task_ids", postgresql.JSONB(), server_default=JSONB_ARRAY, nullable=False),
        sa.Column("requested_by", sa.Uuid(), nullable=True),
        sa.Column("approved_by", postgresql.JSONB(), server_default=JSONB_ARRAY, nullable=False),
        sa.Column("rejected_by", sa.Uuid(), nullable=True),
        sa.Column("decision_comment", sa.Text(), nullable=True),
        sa.Column("executed_by", sa.Uuid(), nullable=True),
        _ts("executed_at"),
        sa.Column("deployment_id", sa.Uuid(), nullable=True),
        *_stamps(),
        _fk("n8n_promotions", "workspace_id", "workspaces", "CASCADE"),
        _fk("n8n_promotions", "from_env_id", "n8n_environments", "CASCADE"),
        _fk("n8n_promotions", "to_env_id", "n8n_environments", "CASCADE"),
        _fk("n8n_promotions", "source_instance_id", "n8n_instances", "CASCADE"),
        _fk("n8n_promotions", "target_instance_id", "n8n_instances", "CASCADE"),
        _fk("n8n_promotions", "requested_by", "users", "SET NULL"),
        _fk("n8n_promotions", "rejected_by", "users", "SET NULL"),
        _fk("n8n_promotions", "executed_by", "users", "SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_n8n_promotions")),
    )
    op.create_index(op.f("ix_n8n_promotions_lineage_id"), "n8n_promotions", ["lineage_id"])
    op.create_index(op.f("ix_n8n_promotions_to_env_id"), "n8n_promotions", ["to_env_id"])
    op.create_index(
        "ix_n8n_promotions_workspace_id_created_at",
        "n8n_promotions",
        ["workspace_id", "created_at"],
    )

    op.create_table(
        "n8n_deployments",
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("promotion_id", sa.Uuid(), nullable=False),
        sa.Column("environment_id", sa.Uuid(), nullable=False),
        sa.Column("from_env_id", sa.Uuid(), nullable=True),
        sa.Column("instance_id", sa.Uuid(), nullable=False),
        sa.Column("lineage_id", sa.Uuid(), nullable=False),
        sa.Column("n8n_workflow_id", sa.String(64), nullable=True),
        sa.Column("name", sa.String(500), nullable=False),
        sa.Column("action", sa.String(10), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("steps", postgresql.JSONB(), server_default=JSONB_ARRAY, nullable=False),
        sa.Column("pre_snapshot_id", sa.Uuid(), nullable=True),
        sa.Column("snapshot_id", sa.Uuid(), nullable=True),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("rolled_back", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("by_user_id", sa.Uuid(), nullable=True),
        *_stamps(),
        _fk("n8n_deployments", "workspace_id", "workspaces", "CASCADE"),
        _fk("n8n_deployments", "promotion_id", "n8n_promotions", "CASCADE"),
        _fk("n8n_deployments", "environment_id", "n8n_environments", "CASCADE"),
        _fk("n8n_deployments", "from_env_id", "n8n_environments", "SET NULL"),
        _fk("n8n_deployments", "instance_id", "n8n_instances", "CASCADE"),
        _fk("n8n_deployments", "pre_snapshot_id", "n8n_snapshots", "SET NULL"),
        _fk("n8n_deployments", "snapshot_id", "n8n_snapshots", "SET NULL"),
        _fk("n8n_deployments", "by_user_id", "users", "SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_n8n_deployments")),
        sa.UniqueConstraint("promotion_id", name=op.f("uq_n8n_deployments_promotion_id")),
    )
    op.create_index(
        "ix_n8n_deployments_environment_created_at",
        "n8n_deployments",
        ["environment_id", "created_at"],
    )


def downgrade() -> None:
    op.drop_table("n8n_deployments")
    op.drop_table("n8n_promotions")
    op.drop_table("n8n_lineages")
