"""Sub-workflow links (parent node, depth) and the archive of execution event logs.

Revision ID: d11d580ca8a0
Revises: 1c8bb150e628
Create Date: 2026-11-23 21:10:35.653670+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "d11d580ca8a0"
down_revision: str | None = "1c8bb150e628"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "execution_events",
        sa.Column("execution_id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("event", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["workflow_executions.id"],
            name=op.f("fk_execution_events_execution_id_workflow_executions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("execution_id", "seq", name=op.f("pk_execution_events")),
    )
    op.add_column(
        "workflow_executions", sa.Column("parent_node_id", sa.String(length=200), nullable=True)
    )
    op.add_column(
        "workflow_executions",
        sa.Column("depth", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.create_index(
        op.f("ix_workflow_executions_parent_execution_id"),
        "workflow_executions",
        ["parent_execution_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(
        op.f("ix_workflow_executions_parent_execution_id"), table_name="workflow_executions"
    )
    op.drop_column("workflow_executions", "depth")
    op.drop_column("workflow_executions", "parent_node_id")
    op.drop_table("execution_events")
