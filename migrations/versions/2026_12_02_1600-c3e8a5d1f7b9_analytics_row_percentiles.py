"""Analytics rows keep their own duration and queue-wait percentiles, so a series whose
points are single rows (hourly, daily) needs no histogram at read time.

Revision ID: c3e8a5d1f7b9
Revises: b7d41f3e9a52
Create Date: 2026-12-02 16:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c3e8a5d1f7b9"
down_revision: str | None = "b7d41f3e9a52"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("duration_p50", "duration_p95", "duration_p99", "wait_p50", "wait_p95", "wait_p99")


def upgrade() -> None:
    for name in COLUMNS:
        op.add_column("analytics_aggregates", sa.Column(name, sa.Float(), nullable=True))
    # Rows written before have none: the next pass rebuilds every hour and day (until
    # then the API reads their histograms, as it does for any row without them).
    op.execute("DELETE FROM analytics_cursors WHERE name = 'aggregate'")


def downgrade() -> None:
    for name in reversed(COLUMNS):
        op.drop_column("analytics_aggregates", name)
