"""Analytics: hourly aggregates per workspace and dimension, the aggregation cursor, and
an index on when a run last changed (created or finished) for the incremental pass.

Revision ID: a4c1e7d2b9f0
Revises: 7bf0c3715ae7
Create Date: 2026-12-01 09:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "a4c1e7d2b9f0"
down_revision: str | None = "7bf0c3715ae7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _counter(name: str, kind: type[sa.types.TypeEngine] = sa.Integer) -> sa.Column:
    return sa.Column(name, kind(), server_default=sa.text("0"), nullable=False)


def _hist(name: str) -> sa.Column:
    return sa.Column(
        name,
        postgresql.JSONB(astext_type=sa.Text()),
        server_default=sa.text("'{}'::jsonb"),
        nullable=False,
    )


def upgrade() -> None:
    op.create_table(
        "analytics_aggregates",
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("bucket", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("key", sa.String(length=400), nullable=False),
        _counter("runs"),
        _counter("pending"),
        _counter("running"),
        _counter("completed"),
        _counter("failed"),
        _counter("cancelled"),
        _counter("duration_count"),
        _counter("duration_sum_ms", sa.Float),
        _hist("duration_hist"),
        _counter("wait_count"),
        _counter("wait_sum_ms", sa.Float),
        _hist("wait_hist"),
        _counter("retries"),
        _counter("input_tokens", sa.BigInteger),
        _counter("output_tokens", sa.BigInteger),
        _counter("cache_read_tokens", sa.BigInteger),
        _counter("cache_write_tokens", sa.BigInteger),
        _counter("cost_usd", sa.Float),
        sa.Column(
            "computed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_analytics_aggregates_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "workspace_id", "bucket", "kind", "key", name=op.f("pk_analytics_aggregates")
        ),
    )
    op.create_table(
        "analytics_cursors",
        sa.Column("name", sa.String(length=50), nullable=False),
        sa.Column("position", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_analytics_cursors")),
    )
    op.create_index(
        "ix_workflow_executions_changed_at",
        "workflow_executions",
        [sa.text("coalesce(finished_at, created_at)")],
    )


def downgrade() -> None:
    op.drop_index("ix_workflow_executions_changed_at", table_name="workflow_executions")
    op.drop_table("analytics_cursors")
    op.drop_table("analytics_aggregates")
