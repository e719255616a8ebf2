"""A run's transition history (execution_transitions), and CHECK constraints that keep
execution and node statuses inside the state machines' tables.

Revision ID: 7f3c9a1e5b20
Revises: b1e3a2c10ac9
Create Date: 2026-11-30 10:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7f3c9a1e5b20"
down_revision: str | None = "b1e3a2c10ac9"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EXECUTION = "status IN ('pending', 'running', 'completed', 'failed', 'cancelled')"
NODE = "status IN ('pending', 'running', 'retrying', 'completed', 'failed', 'skipped', 'cancelled')"


def upgrade() -> None:
    op.create_table(
        "execution_transitions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("execution_id", sa.Uuid(), nullable=False),
        sa.Column("node_id", sa.String(length=200), nullable=True),
        sa.Column("iteration", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("from_status", sa.String(length=20), nullable=True),
        sa.Column("to_status", sa.String(length=20), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("actor", sa.String(length=200), nullable=True),
        sa.Column(
            "at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["workflow_executions.id"],
            name=op.f("fk_execution_transitions_execution_id_workflow_executions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_execution_transitions")),
    )
    op.create_index(
        "ix_execution_transitions_execution_id_id",
        "execution_transitions",
        ["execution_id", "id"],
        unique=False,
    )
    # NOT VALID, then VALIDATE: adding a checked constraint scans the table under an
    # exclusive lock; validating afterwards takes a lock that lets writes go on.
    for table, name, check in (
        ("workflow_executions", "ck_workflow_executions_status", EXECUTION),
        ("node_executions", "ck_node_executions_status", NODE),
    ):
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} CHECK ({check}) NOT VALID")
        op.execute(f"ALTER TABLE {table} VALIDATE CONSTRAINT {name}")
    # A loop body's node is `<loop>.<node>`: up to 129 characters, over the old 64.
    op.alter_column(
        "node_executions",
        "node_id",
        existing_type=sa.String(length=64),
        type_=sa.String(length=200),
        existing_nullable=False,
    )


def downgrade() -> None:
    op.alter_column(
        "node_executions",
        "node_id",
        existing_type=sa.String(length=200),
        type_=sa.String(length=64),
        existing_nullable=False,
    )
    op.drop_constraint(op.f("ck_node_executions_status"), "node_executions", type_="check")
    op.drop_constraint(op.f("ck_workflow_executions_status"), "workflow_executions", type_="check")
    op.drop_index("ix_execution_transitions_execution_id_id", table_name="execution_transitions")
    op.drop_table("execution_transitions")
