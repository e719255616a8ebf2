"""Analytics day rows (a `span` column in the aggregates' key) and workspace quota
overrides.

Revision ID: b7d41f3e9a52
Revises: e4a9c2f17b36
Create Date: 2026-12-02 15:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "b7d41f3e9a52"
down_revision: str | None = "e4a9c2f17b36"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "analytics_aggregates",
        sa.Column("span", sa.String(length=5), server_default="hour", nullable=False),
    )
    op.drop_constraint("pk_analytics_aggregates", "analytics_aggregates", type_="primary")
    op.create_primary_key(
        "pk_analytics_aggregates",
        "analytics_aggregates",
        ["workspace_id", "span", "bucket", "kind", "key"],
    )
    # No day rows exist yet: the next pass starts from scratch and writes hours and days
    # alike (until then the API computes the whole window from the runs).
    op.execute("DELETE FROM analytics_cursors WHERE name = 'aggregate'")
    op.create_table(
        "workspace_quotas",
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column(
            "limits",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_workspace_quotas_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("workspace_id", name=op.f("pk_workspace_quotas")),
    )


def downgrade() -> None:
    op.drop_table("workspace_quotas")
    op.execute("DELETE FROM analytics_aggregates WHERE span <> 'hour'")
    op.drop_constraint("pk_analytics_aggregates", "analytics_aggregates", type_="primary")
    op.create_primary_key(
        "pk_analytics_aggregates", "analytics_aggregates", ["workspace_id", "bucket", "kind", "key"]
    )
    op.drop_column("analytics_aggregates", "span")
