"""Workflow templates published by a workspace, and improvement suggestions per workflow.

Revision ID: c5e2f8a1d3b7
Revises: a4c1e7d2b9f0
Create Date: 2026-12-01 10:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "c5e2f8a1d3b7"
down_revision: str | None = "a4c1e7d2b9f0"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _stamps() -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    ]  # fmt: skip


def upgrade() -> None:
    op.create_table(
        "workflow_templates",
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), server_default=sa.text("''"), nullable=False),
        sa.Column("category", sa.String(length=50), server_default=sa.text("'custom'"), nullable=False),
        sa.Column("definition", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("parameters", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False),
        sa.Column("source_workflow_id", sa.Uuid(), nullable=True),
        sa.Column("created_by", sa.Uuid(), nullable=True),
        *_stamps(),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"], name=op.f("fk_workflow_templates_workspace_id_workspaces"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["source_workflow_id"], ["workflows.id"], name=op.f("fk_workflow_templates_source_workflow_id_workflows"), ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["created_by"], ["users.id"], name=op.f("fk_workflow_templates_created_by_users"), ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workflow_templates")),
        sa.UniqueConstraint("workspace_id", "name", name=op.f("uq_workflow_templates_workspace_id_name")),
    )  # fmt: skip
    op.create_index(
        op.f("ix_workflow_templates_workspace_id"), "workflow_templates", ["workspace_id"]
    )
    op.create_table(
        "workflow_suggestions",
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("workflow_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("fingerprint", sa.String(length=300), nullable=False),
        sa.Column("source", sa.String(length=20), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("evidence", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("patch", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False),
        sa.Column("base_version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=20), server_default=sa.text("'open'"), nullable=False),
        sa.Column("decided_by", sa.Uuid(), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        *_stamps(),
        sa.CheckConstraint("status IN ('open', 'accepted', 'dismissed')", name=op.f("ck_workflow_suggestions_status")),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"], name=op.f("fk_workflow_suggestions_workspace_id_workspaces"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["workflow_id"], ["workflows.id"], name=op.f("fk_workflow_suggestions_workflow_id_workflows"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["decided_by"], ["users.id"], name=op.f("fk_workflow_suggestions_decided_by_users"), ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workflow_suggestions")),
        sa.UniqueConstraint("workflow_id", "fingerprint", name=op.f("uq_workflow_suggestions_workflow_id_fingerprint")),
    )  # fmt: skip
    op.create_index(
        op.f("ix_workflow_suggestions_workspace_id"), "workflow_suggestions", ["workspace_id"]
    )
    op.create_index(
        op.f("ix_workflow_suggestions_workflow_id"), "workflow_suggestions", ["workflow_id"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_workflow_suggestions_workflow_id"), table_name="workflow_suggestions")
    op.drop_index(op.f("ix_workflow_suggestions_workspace_id"), table_name="workflow_suggestions")
    op.drop_table("workflow_suggestions")
    op.drop_index(op.f("ix_workflow_templates_workspace_id"), table_name="workflow_templates")
    op.drop_table("workflow_templates")
