"""What the `analytics` WebSocket channel sends: the workspace's runs by status (all
time) and the current hour's aggregate, recomputed when a run changes status."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.analytics.aggregate import HOUR, compute, hour_of
from backend.analytics.service import STATUSES, Sum
from backend.models import WorkflowExecution


async def counters(session: AsyncSession, workspace_id: uuid.UUID) -> dict[str, Any]:
    """The `analytics.counters` event's data."""
    rows = await session.execute(
        select(WorkflowExecution.status, func.count())
        .where(WorkflowExecution.workspace_id == workspace_id)
        .group_by(WorkflowExecution.status)
    )
    counts = dict(rows.tuples().all())
    hour = hour_of(datetime.now(UTC))
    live = await compute(session, workspace_id, hour, hour + HOUR)
    current = Sum()
    for (_, kind, _key), row in live.items():
        if kind == "workspace":
            current.add(row.values())
    return {
        **{s: int(counts.get(s, 0)) for s in STATUSES},
        "hour": {"period": hour.isoformat(), **current.stats()},
    }
