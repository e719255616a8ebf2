"""n8n fleets: instances, their synced workflows and executions, reported errors and
watches.

Revision ID: e4a9c2f17b36
Revises: dd362d70efb0
Create Date: 2026-12-02 14:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "e4a9c2f17b36"
down_revision: str | None = "dd362d70efb0"
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
        "n8n_instances",
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("base_url", sa.String(2000), nullable=False),
        sa.Column("environment", sa.String(50), server_default=sa.text("'production'"), nullable=False),
        sa.Column("tags", postgresql.JSONB(), server_default=JSONB_ARRAY, nullable=False),
        sa.Column("secrets_encrypted", sa.Text(), nullable=False),
        sa.Column("intake_token_hash", sa.String(64), nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("status", sa.String(20), server_default=sa.text("'unknown'"), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("n8n_version", sa.String(50), nullable=True),
        sa.Column("capabilities", postgresql.JSONB(), server_default=JSONB_OBJECT, nullable=False),
        _ts("last_checked_at"),
        _ts("last_synced_at"),
        sa.Column("sync_error", sa.Text(), nullable=True),
        _ts("sync_claimed_until"),
        _ts("executions_after"),
        sa.Column("error_workflow_id", sa.String(64), nullable=True),
        sa.Column("notify", postgresql.JSONB(), server_default=JSONB_OBJECT, nullable=False),
        sa.Column("created_by", sa.Uuid(), nullable=True),
        *_stamps(),
        _fk("n8n_instances", "workspace_id", "workspaces", "CASCADE"),
        _fk("n8n_instances", "created_by", "users", "SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_n8n_instances")),
        sa.UniqueConstraint("workspace_id", "name", name=op.f("uq_n8n_instances_workspace_id_name")),
        sa.UniqueConstraint("intake_token_hash", name=op.f("uq_n8n_instances_intake_token_hash")),
    )  # fmt: skip
    op.create_index(
        "ix_n8n_instances_sync_due",
        "n8n_instances",
        ["last_synced_at"],
        postgresql_where=sa.text("enabled"),
    )
    op.create_table(
        "n8n_workflows",
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("instance_id", sa.Uuid(), nullable=False),
        sa.Column("n8n_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(500), nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("archived", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("tags", postgresql.JSONB(), server_default=JSONB_ARRAY, nullable=False),
        sa.Column("version_id", sa.String(64), nullable=True),
        sa.Column("node_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("definition", postgresql.JSONB(), server_default=JSONB_OBJECT, nullable=False),
        sa.Column("error_workflow", sa.String(64), nullable=True),
        _ts("n8n_created_at"),
        _ts("n8n_updated_at"),
        _ts("synced_at"),
        *_stamps(),
        _fk("n8n_workflows", "workspace_id", "workspaces", "CASCADE"),
        _fk("n8n_workflows", "instance_id", "n8n_instances", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_n8n_workflows")),
        sa.UniqueConstraint("instance_id", "n8n_id", name=op.f("uq_n8n_workflows_instance_id_n8n_id")),
    )  # fmt: skip
    op.create_table(
        "n8n_executions",
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("instance_id", sa.Uuid(), nullable=False),
        sa.Column("n8n_id", sa.String(64), nullable=False),
        sa.Column("workflow_n8n_id", sa.String(64), nullable=True),
        sa.Column("workflow_id", sa.Uuid(), nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("mode", sa.String(30), nullable=True),
        sa.Column("finished", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        _ts("started_at"),
        _ts("stopped_at"),
        sa.Column("retry_of", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("failed_node", sa.String(500), nullable=True),
        *_stamps(),
        _fk("n8n_executions", "workspace_id", "workspaces", "CASCADE"),
        _fk("n8n_executions", "instance_id", "n8n_instances", "CASCADE"),
        _fk("n8n_executions", "workflow_id", "n8n_workflows", "SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_n8n_executions")),
        sa.UniqueConstraint("instance_id", "n8n_id", name=op.f("uq_n8n_executions_instance_id_n8n_id")),
    )  # fmt: skip
    op.create_index(
        "ix_n8n_executions_instance_id_started_at", "n8n_executions", ["instance_id", "started_at"]
    )
    op.create_index(op.f("ix_n8n_executions_workflow_id"), "n8n_executions", ["workflow_id"])
    op.create_table(
        "n8n_errors",
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("instance_id", sa.Uuid(), nullable=False),
        sa.Column("dedupe_key", sa.String(200), nullable=False),
        sa.Column("execution_n8n_id", sa.String(64), nullable=True),
        sa.Column("workflow_n8n_id", sa.String(64), nullable=True),
        sa.Column("workflow_id", sa.Uuid(), nullable=True),
        sa.Column("workflow_name", sa.String(500), nullable=True),
        sa.Column("node", sa.String(500), nullable=True),
        sa.Column("message", sa.Text(), server_default=sa.text("''"), nullable=False),
        sa.Column("url", sa.String(2000), nullable=True),
        sa.Column("mode", sa.String(30), nullable=True),
        sa.Column("reports", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("notified", postgresql.JSONB(), server_default=JSONB_OBJECT, nullable=False),
        *_stamps(),
        _fk("n8n_errors", "workspace_id", "workspaces", "CASCADE"),
        _fk("n8n_errors", "instance_id", "n8n_instances", "CASCADE"),
        _fk("n8n_errors", "workflow_id", "n8n_workflows", "SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_n8n_errors")),
        sa.UniqueConstraint("instance_id", "dedupe_key", name=op.f("uq_n8n_errors_instance_id_dedupe_key")),
    )  # fmt: skip
    op.create_index(
        "ix_n8n_errors_instance_id_created_at", "n8n_errors", ["instance_id", "created_at"]
    )
    op.create_table(
        "n8n_watches",
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("instance_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("workflow_n8n_id", sa.String(64), server_default=sa.text("''"), nullable=False),
        *_stamps(),
        _fk("n8n_watches", "workspace_id", "workspaces", "CASCADE"),
        _fk("n8n_watches", "instance_id", "n8n_instances", "CASCADE"),
        _fk("n8n_watches", "user_id", "users", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_n8n_watches")),
        sa.UniqueConstraint("instance_id", "user_id", "workflow_n8n_id", name=op.f("uq_n8n_watches_instance_id_user_id_workflow_n8n_id")),
    )  # fmt: skip
    op.create_index(op.f("ix_n8n_watches_user_id"), "n8n_watches", ["user_id"])


def downgrade() -> None:
    op.drop_table("n8n_watches")
    op.drop_table("n8n_errors")
    op.drop_table("n8n_executions")
    op.drop_table("n8n_workflows")
    op.drop_table("n8n_instances")
