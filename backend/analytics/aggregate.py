"""Building the hourly aggregates from runs and their node rows.

`compute` turns one workspace's runs created in [start, end) into rows (one per hour,
dimension and key); it writes nothing, so the API uses it for the live tail too.
`rebuild` replaces the stored rows of some hours with freshly computed ones, and the
rows of their days with the sums of their hours, in one transaction: running it twice
for the same hours leaves the same rows (idempotent).
`aggregate_pass` finds the hours holding a run created or finished since the cursor
(late finishes of old runs included) and rebuilds them; beat sends it as
`analytics.aggregate` on the `default` queue.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, select, text, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.analytics import histogram
from backend.kit.db import UnitOfWork
from backend.kit.logging import get_logger
from backend.models import AnalyticsAggregate, AnalyticsCursor, WorkflowVersion

log = get_logger(__name__)

CURSOR = "aggregate"
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
# Each pass looks this far behind its cursor again: a run inserted by a transaction
# that began before the last pass and committed after it has a created_at (and a
# worker's finished_at) older than the cursor. Rebuilding is idempotent, so looking
# again costs time, never correctness.
OVERLAP = timedelta(minutes=5)
# Hours rebuilt per transaction: a first pass over months of runs goes in slices.
HOURS_PER_TRANSACTION = 48

_COUNTERS = (
    "runs", "pending", "running", "completed", "failed", "cancelled",
    "duration_count", "duration_sum_ms", "wait_count", "wait_sum_ms", "retries",
    "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "cost_usd",
)  # fmt: skip


def hour_of(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def day_of(at: datetime) -> datetime:
    return hour_of(at).replace(hour=0)


@dataclass
class Row:
    """One aggregate row being summed up."""

    runs: int = 0
    pending: int = 0
    running: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    duration_count: int = 0
    duration_sum_ms: float = 0.0
    duration_hist: dict[str, int] = field(default_factory=dict)
    wait_count: int = 0
    wait_sum_ms: float = 0.0
    wait_hist: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0

    def count(self, status: str) -> None:
        self.runs += 1
        if status in ("pending", "running", "completed", "failed", "cancelled"):
            setattr(self, status, getattr(self, status) + 1)

    def duration(self, ms: float | None) -> None:
        if ms is not None and ms >= 0:
            self.duration_count += 1
            self.duration_sum_ms += ms
            histogram.add(self.duration_hist, ms)

    def wait(self, ms: float | None) -> None:
        if ms is not None and ms >= 0:
            self.wait_count += 1
            self.wait_sum_ms += ms
            histogram.add(self.wait_hist, ms)

    def usage(self, tokens_in: int, tokens_out: int, cost: float, cache: tuple[int, int]) -> None:
        self.input_tokens += tokens_in or 0
        self.output_tokens += tokens_out or 0
        self.cost_usd += cost or 0.0
        self.cache_read_tokens += cache[0]
        self.cache_write_tokens += cache[1]

    def fold(self, row: Any) -> None:
        """Add a stored row (hours into their day)."""
        for name in _COUNTERS:
            setattr(self, name, getattr(self, name) + (row[name] or 0))
        histogram.merge(self.duration_hist, row["duration_hist"] or {})
        histogram.merge(self.wait_hist, row["wait_hist"] or {})

    def values(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in _COUNTERS}
        out["duration_hist"] = self.duration_hist
        out["wait_hist"] = self.wait_hist
        out["cost_usd"] = round(self.cost_usd, 9)
        out["duration_sum_ms"] = round(self.duration_sum_ms, 3)
        out["wait_sum_ms"] = round(self.wait_sum_ms, 3)
        for prefix, hist in (("duration", self.duration_hist), ("wait", self.wait_hist)):
            for name, value in histogram.quantiles(hist).items():
                out[f"{prefix}_{name}"] = value
        return out


Key = tuple[datetime, str, str]

# Node id -> (type, agent id) per pinned version. Versions never change once written,
# so what was read once is good for ever (bounded, oldest dropped first).
_NODE_MAPS: OrderedDict[tuple[uuid.UUID, int], dict[str, tuple[str, str | None]]] = OrderedDict()
_NODE_MAPS_MAX = 2048
NODE_TYPES = ("trigger", "agent", "action", "logic", "integration")


def node_map(definition: Any) -> dict[str, tuple[str, str | None]]:
    """Every node of a definition, loop bodies included, by id: (type, agent id)."""
    found: dict[str, tuple[str, str | None]] = {}

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            node_id, kind = value.get("id"), value.get("type")
            if isinstance(node_id, str) and kind in NODE_TYPES:
                config = value.get("config")
                agent = config.get("agent_id") if isinstance(config, dict) else None
                found.setdefault(node_id, (str(kind), str(agent) if agent else None))
            for child in value.values():
                walk(child)
        elif isinstance(value, list):
            for child in value:
                walk(child)

    walk(definition)
    return found


async def _node_maps(
    session: AsyncSession, pinned: Iterable[tuple[uuid.UUID, int]]
) -> dict[tuple[uuid.UUID, int], dict[str, tuple[str, str | None]]]:
    wanted = set(pinned)
    missing = [p for p in wanted if p not in _NODE_MAPS]
    if missing:
        rows = await session.execute(
            select(
                WorkflowVersion.workflow_id, WorkflowVersion.number, WorkflowVersion.definition
            ).where(tuple_(WorkflowVersion.workflow_id, WorkflowVersion.number).in_(missing))
        )
        for workflow_id, number, definition in rows:
            _NODE_MAPS[(workflow_id, number)] = node_map(definition)
            if len(_NODE_MAPS) > _NODE_MAPS_MAX:
                _NODE_MAPS.popitem(last=False)
    return {p: _NODE_MAPS.get(p, {}) for p in wanted}


def _type_of(nodes: dict[str, tuple[str, str | None]], node_id: str) -> tuple[str, str | None]:
    hit = nodes.get(node_id)
    if hit is None and "." in node_id:
        # A loop body's node runs as `<loop>.<node>`; the body defines it as `<node>`.
        hit = nodes.get(node_id.rsplit(".", 1)[1])
    return hit or ("unknown", None)


_RUNS = text(
    """
    SELECT id, workflow_id, version, status, created_at, started_at, duration_ms,
           input_tokens, output_tokens, cost_usd
    FROM workflow_executions
    WHERE workspace_id = :ws AND created_at >= :start AND created_at < :end
    """
)

_NODES = text(
    """
    SELECT n.execution_id, n.node_id, n.status, n.attempt, n.duration_ms,
           n.input_tokens, n.output_tokens, n.cost_usd,
           CASE WHEN jsonb_typeof(n.output) = 'object' THEN n.output->>'model' END AS model,
           CASE WHEN jsonb_typeof(n.output) = 'object'
                 AND jsonb_typeof(n.output->'usage') = 'object'
                THEN n.output->'usage' END AS usage,
           n.error->>'class' AS error_class
    FROM node_executions n
    JOIN workflow_executions e ON e.id = n.execution_id
    WHERE e.workspace_id = :ws AND e.created_at >= :start AND e.created_at < :end
    """
)


def _int(value: Any) -> int:
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


async def compute(
    session: AsyncSession, workspace_id: uuid.UUID, start: datetime, end: datetime
) -> dict[Key, Row]:
    """The aggregate rows of the runs created in [start, end), by (hour, kind, key)."""
    params = {"ws": workspace_id, "start": start, "end": end}
    runs = (await session.execute(_RUNS, params)).all()
    rows: dict[Key, Row] = defaultdict(Row)
    if not runs:
        return rows
    maps = await _node_maps(session, {(r.workflow_id, r.version) for r in runs})
    by_id: dict[uuid.UUID, Any] = {}
    for r in runs:
        by_id[r.id] = r
        bucket = hour_of(r.created_at)
        wait = (r.started_at - r.created_at).total_seconds() * 1000 if r.started_at else None
        whole, flow = (
            rows[(bucket, "workspace", "")],
            rows[(bucket, "workflow", str(r.workflow_id))],
        )
        for target in (whole, flow):
            target.count(r.status)
            if r.status in ("completed", "failed", "cancelled"):
                target.duration(r.duration_ms)
            target.wait(wait)
            target.usage(r.input_tokens, r.output_tokens, r.cost_usd, (0, 0))
    for n in (await session.execute(_NODES, params)).all():
        run = by_id.get(n.execution_id)
        if run is None:  # created in the range after the runs were read
            continue
        bucket = hour_of(run.created_at)
        kind, agent_id = _type_of(maps.get((run.workflow_id, run.version), {}), n.node_id)
        retries = max(0, (n.attempt or 0) - 1)
        usage = n.usage if isinstance(n.usage, dict) else {}
        cache = (
            _int(usage.get("cache_read_input_tokens")),
            _int(usage.get("cache_creation_input_tokens")),
        )
        targets = [rows[(bucket, "node_type", kind)]]
        if n.model:
            targets.append(rows[(bucket, "model", str(n.model)[:400])])
        if agent_id:
            targets.append(rows[(bucket, "agent", agent_id[:400])])
        for target in targets:
            target.count(n.status)
            if n.status in ("completed", "failed", "cancelled"):
                target.duration(n.duration_ms)
            target.retries += retries
            target.usage(n.input_tokens, n.output_tokens, n.cost_usd, cache)
        whole, flow = (
            rows[(bucket, "workspace", "")],
            rows[(bucket, "workflow", str(run.workflow_id))],
        )
        for target in (whole, flow):
            target.retries += retries
            target.cache_read_tokens += cache[0]
            target.cache_write_tokens += cache[1]
        if n.status == "failed":
            error_class = str(n.error_class or "unknown")[:40]
            key = f"{run.workflow_id}/{n.node_id}/{error_class}"[:400]
            failure = rows[(bucket, "failure", key)]
            failure.count("failed")
            failure.duration(n.duration_ms)
    return rows


def _hours(start: datetime, end: datetime) -> list[datetime]:
    out, at = [], hour_of(start)
    while at < end:
        out.append(at)
        at += HOUR
    return out


def _slices(hours: Sequence[datetime]) -> list[tuple[datetime, datetime, list[datetime]]]:
    """Consecutive runs of hours, at most HOURS_PER_TRANSACTION each: (start, end, hours)."""
    out: list[tuple[datetime, datetime, list[datetime]]] = []
    for h in sorted(set(hours)):
        if out and h == out[-1][1] and len(out[-1][2]) < HOURS_PER_TRANSACTION:
            out[-1] = (out[-1][0], h + HOUR, [*out[-1][2], h])
        else:
            out.append((h, h + HOUR, [h]))
    return out


async def rebuild(
    sessionmaker: async_sessionmaker[AsyncSession],
    workspace_id: uuid.UUID,
    hours: Sequence[datetime],
) -> int:
    """Replace the stored rows of these hours with ones computed from the runs now;
    returns how many rows were written."""
    written = 0
    for start, end, slice_hours in _slices(hours):
        async with UnitOfWork(sessionmaker) as uow:
            session = uow.session
            # Serialises two passes over the same workspace (two beats, a manual run):
            # the second waits and then writes the same rows again.
            await session.execute(
                text("SELECT pg_advisory_xact_lock(hashtext('analytics:' || :ws))"),
                {"ws": str(workspace_id)},
            )
            rows = await compute(session, workspace_id, start, end)
            await session.execute(
                delete(AnalyticsAggregate).where(
                    AnalyticsAggregate.workspace_id == workspace_id,
                    AnalyticsAggregate.span == "hour",
                    AnalyticsAggregate.bucket.in_(slice_hours),
                )
            )
            written += await _insert(session, workspace_id, "hour", rows)
            written += await _rebuild_days(session, workspace_id, {day_of(h) for h in slice_hours})
    return written


async def _insert(
    session: AsyncSession, workspace_id: uuid.UUID, span: str, rows: dict[Key, Row]
) -> int:
    values = [
        {"workspace_id": workspace_id, "span": span, "bucket": b, "kind": k, "key": key,
         **row.values()}
        for (b, k, key), row in rows.items()
    ]  # fmt: skip
    for first in range(0, len(values), 1000):
        await session.execute(pg_insert(AnalyticsAggregate), values[first : first + 1000])
    return len(values)


_HOURS_OF_DAYS = text(
    """
    SELECT date_trunc('day', bucket, 'UTC') AS day, kind, key, runs, pending, running,
           completed, failed, cancelled, duration_count, duration_sum_ms, duration_hist,
           wait_count, wait_sum_ms, wait_hist, retries, input_tokens, output_tokens,
           cache_read_tokens, cache_write_tokens, cost_usd
    FROM analytics_aggregates
    WHERE workspace_id = :ws AND span = 'hour' AND bucket >= :start AND bucket < :end
    """
)


async def _rebuild_days(session: AsyncSession, workspace_id: uuid.UUID, days: set[datetime]) -> int:
    """Each of these days' row = the sum of its stored hour rows (read back inside the
    same transaction and lock, so hours rebuilt by an earlier slice count too)."""
    written = 0
    for first, last in _day_ranges(days):
        await session.execute(
            delete(AnalyticsAggregate).where(
                AnalyticsAggregate.workspace_id == workspace_id,
                AnalyticsAggregate.span == "day",
                AnalyticsAggregate.bucket >= first,
                AnalyticsAggregate.bucket < last,
            )
        )
        result = await session.execute(
            _HOURS_OF_DAYS, {"ws": workspace_id, "start": first, "end": last}
        )
        summed: dict[Key, Row] = defaultdict(Row)
        for r in result:
            summed[(r.day, r.kind, r.key)].fold(r._mapping)
        written += await _insert(session, workspace_id, "day", summed)
    return written


def _day_ranges(days: set[datetime]) -> list[tuple[datetime, datetime]]:
    out: list[tuple[datetime, datetime]] = []
    for d in sorted(days):
        if out and out[-1][1] == d:
            out[-1] = (out[-1][0], d + DAY)
        else:
            out.append((d, d + DAY))
    return out


_CHANGED = text(
    """
    SELECT DISTINCT workspace_id, date_trunc('hour', created_at) AS bucket
    FROM workflow_executions
    WHERE coalesce(finished_at, created_at) > :since
      AND coalesce(finished_at, created_at) <= :until
    """
).bindparams(bindparam("since"), bindparam("until"))


async def cursor(session: AsyncSession) -> datetime | None:
    return await session.scalar(
        select(AnalyticsCursor.position).where(AnalyticsCursor.name == CURSOR)
    )


async def aggregate_pass(
    sessionmaker: async_sessionmaker[AsyncSession], now: datetime | None = None
) -> dict[str, int]:
    """Fold every change since the cursor into the aggregates; returns what it did."""
    now = now or datetime.now(UTC)
    async with sessionmaker() as session:
        position = await cursor(session)
        since = (position - OVERLAP) if position else datetime(1970, 1, 1, tzinfo=UTC)
        changed = (await session.execute(_CHANGED, {"since": since, "until": now})).all()
    by_workspace: dict[uuid.UUID, list[datetime]] = defaultdict(list)
    for workspace_id, bucket in changed:
        by_workspace[workspace_id].append(hour_of(bucket))
    written = 0
    for workspace_id, hours in by_workspace.items():
        written += await rebuild(sessionmaker, workspace_id, hours)
    async with UnitOfWork(sessionmaker) as uow:
        # Only forward: a pass that started before a slower one finished never moves
        # the cursor back over what the other folded in.
        await uow.session.execute(
            pg_insert(AnalyticsCursor)
            .values(name=CURSOR, position=now)
            .on_conflict_do_update(
                index_elements=["name"],
                set_={"position": text("greatest(analytics_cursors.position, excluded.position)")},
            )
        )
    result = {
        "workspaces": len(by_workspace),
        "hours": sum(len(set(h)) for h in by_workspace.values()),
        "rows": written,
    }
    log.info("analytics.aggregated", **result)
    return result
