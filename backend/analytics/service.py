"""Answers of the analytics API: stored aggregates (day rows for whole days, hour rows
for the edges) for the time the last pass covered, summed in PostgreSQL, plus the live
tail computed from the runs themselves, into totals, series and breakdowns; each answer
kept briefly in Redis."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import TextClause, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from backend.analytics import histogram
from backend.analytics.aggregate import (
    DAY,
    HOUR,
    OVERLAP,
    Key,
    Row,
    compute,
    cursor,
    day_of,
    hour_of,
)
from backend.config import Settings
from backend.kit.errors import ValidationFailed
from backend.kit.logging import get_logger
from backend.models import Agent, Workflow

log = get_logger(__name__)

Granularity = Literal["hour", "day", "week", "month"]
STATUSES = ("pending", "running", "completed", "failed", "cancelled")
_STEP = {
    "hour": timedelta(hours=1),
    "day": timedelta(days=1),
    "week": timedelta(days=7),
    "month": timedelta(days=28),
}
_SUMS = (
    "runs", "pending", "running", "completed", "failed", "cancelled",
    "duration_count", "duration_sum_ms", "wait_count", "wait_sum_ms", "retries",
    "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "cost_usd",
)  # fmt: skip


@dataclass(frozen=True)
class Window:
    since: datetime
    until: datetime
    granularity: Granularity

    def key(self) -> str:
        return f"{self.since.isoformat()}|{self.until.isoformat()}|{self.granularity}"


def _aware(at: datetime) -> datetime:
    # A time without a zone is taken as UTC, the zone every answer is in.
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def window(
    settings: Settings,
    since: datetime | None,
    until: datetime | None,
    granularity: Granularity,
    now: datetime | None = None,
) -> Window:
    """The request's period, checked: whole hours (since rounded down, until up), at most
    ANALYTICS__MAX_RANGE_DAYS long and ANALYTICS__MAX_POINTS points of series."""
    now = now or datetime.now(UTC)
    end = _aware(until) if until else now
    start = _aware(since) if since else end - timedelta(days=30)
    if start >= end:
        raise ValidationFailed("since must be before until", field="since")
    limit = settings.analytics.max_range_days
    if end - start > timedelta(days=limit):
        raise ValidationFailed(f"since..until may span at most {limit} days", field="since")
    start = hour_of(start)
    end_h = hour_of(end)
    end = end_h if end_h == end else end_h + HOUR
    points = (end - start) / _STEP[granularity]
    if points > settings.analytics.max_points:
        raise ValidationFailed(
            f"{granularity} points over this range exceed {settings.analytics.max_points}; "
            "choose a coarser granularity or a shorter range",
            field="granularity",
        )
    return Window(start, end, granularity)


def period_of(bucket: datetime, granularity: Granularity) -> datetime:
    bucket = bucket.astimezone(UTC)
    if granularity == "hour":
        return bucket
    day = bucket.replace(hour=0, minute=0, second=0, microsecond=0)
    if granularity == "day":
        return day
    if granularity == "week":
        return day - timedelta(days=day.weekday())  # ISO weeks start on Monday
    return day.replace(day=1)


def _no_quantiles(_: Mapping[str, int]) -> dict[str, float | None]:
    return {"p50": None, "p95": None, "p99": None}


class Sum:
    """Aggregate rows added together."""

    def __init__(self) -> None:
        self.values: dict[str, float] = dict.fromkeys(_SUMS, 0)
        self.duration_hist: dict[str, int] = {}
        self.wait_hist: dict[str, int] = {}
        # Percentiles PostgreSQL already read off the summed histogram ("d"uration,
        # "w"ait), for a group nothing else is added to (a past point of a series).
        self.fixed: dict[str, dict[str, float | None]] = {}
        self.parts = 0

    def add(self, row: Mapping[str, Any], hists: bool = True) -> None:
        self.parts += 1
        v = self.values
        for name in _SUMS:
            v[name] += row[name] or 0
        if hists:
            histogram.merge(self.duration_hist, row["duration_hist"] or {})
            histogram.merge(self.wait_hist, row["wait_hist"] or {})

    def merge(self, other: Sum) -> None:
        # Fixed percentiles cannot be added up: they carry over only into an empty sum.
        self.fixed = dict(other.fixed) if self.parts == 0 else {}
        self.parts += max(1, other.parts)
        for name in _SUMS:
            self.values[name] += other.values[name]
        histogram.merge(self.duration_hist, other.duration_hist)
        histogram.merge(self.wait_hist, other.wait_hist)

    def _quantiles(self, which: str, hist: dict[str, int]) -> dict[str, float | None]:
        fixed = self.fixed.get(which)
        return fixed if fixed is not None and not hist else histogram.quantiles(hist)

    def stats(self, quantiles: bool = True) -> dict[str, Any]:
        v = self.values
        ended = v["completed"] + v["failed"] + v["cancelled"]

        def q(which: str, hist: dict[str, int]) -> dict[str, float | None]:
            return self._quantiles(which, hist) if quantiles else _no_quantiles(hist)

        return {
            "runs": int(v["runs"]),
            "by_status": {s: int(v[s]) for s in STATUSES},
            "success_rate": round(v["completed"] / ended, 4) if ended else None,
            "duration_ms": {
                "mean": round(v["duration_sum_ms"] / v["duration_count"], 3)
                if v["duration_count"]
                else None,
                **q("d", self.duration_hist),
            },
            "queue_wait_ms": {
                "mean": round(v["wait_sum_ms"] / v["wait_count"], 3) if v["wait_count"] else None,
                **q("w", self.wait_hist),
            },
            "retries": int(v["retries"]),
            "tokens": {
                "input": int(v["input_tokens"]),
                "output": int(v["output_tokens"]),
                "cache_read": int(v["cache_read_tokens"]),
                "cache_write": int(v["cache_write_tokens"]),
            },
            "cost_usd": round(v["cost_usd"], 6),
        }


Group = tuple[datetime | None, str, str]  # (period or None for the whole window, kind, key)

_STORED_PCT = tuple(f"{h}_{q}" for h in ("duration", "wait") for q in ("p50", "p95", "p99"))
# Sums, the number of rows in the group, and the stored percentiles (a group of one
# row takes them as they are).
_COLUMNS = ", ".join(
    [f"sum({c}) AS {c}" for c in _SUMS]
    + ["count(*) AS n_rows"]
    + [f"min({c}) AS {c}" for c in _STORED_PCT]
)
_PERIOD = {
    "hour": "bucket",
    "day": "date_trunc('day', bucket, 'UTC')",
    "week": "date_trunc('week', bucket, 'UTC')",  # ISO weeks: Monday
    "month": "date_trunc('month', bucket, 'UTC')",
}
# Stored rows: day rows for whole days, hour rows for the ragged edges (or hour rows
# throughout for an hourly series), filtered by kind and optionally by key or key prefix.
_SOURCE = """
    FROM analytics_aggregates
    WHERE workspace_id = :ws AND kind = ANY(:kinds)
      AND (CAST(:key AS text) IS NULL OR key = :key OR key LIKE :prefix)
      AND ((span = 'day' AND bucket >= :d0 AND bucket < :d1)
        OR (span = 'hour' AND ((bucket >= :since AND bucket < :d0)
                            OR (bucket >= :d1 AND bucket < :until))))
"""


def _hist_rows(column: str, period: str, which: str) -> str:
    source = _SOURCE.replace(
        "FROM analytics_aggregates",
        f"FROM analytics_aggregates, jsonb_each_text({column}) AS e(slot, n)",
    )
    return (
        f"SELECT {period} AS period, kind, key, '{which}' AS which, e.slot, "
        f"e.n::bigint AS n {source}"
    )


# Built once from the constants above (no input reaches the text): one statement per
# series shape (None: the whole window). Histograms are summed slot by slot in SQL.
_COUNTER_SQL: dict[str | None, TextClause] = {}
_HIST_SQL: dict[str | None, TextClause] = {}
_PCT_SQL: dict[str | None, TextClause] = {}
for _shape, _period in [*_PERIOD.items(), (None, "CAST(NULL AS timestamptz)")]:
    _COUNTER_SQL[_shape] = text(
        f"SELECT {_period} AS period, kind, key, {_COLUMNS} {_SOURCE} GROUP BY 1, 2, 3"
    )
    _slots = (
        "SELECT period, kind, key, which, slot::int AS slot, sum(n) AS n FROM ("  # noqa: S608
        f"{_hist_rows('duration_hist', _period, 'd')} UNION ALL "
        f"{_hist_rows('wait_hist', _period, 'w')}) s"
        " WHERE (CAST(:tail AS timestamptz) IS NULL OR {cmp})"
        " AND (CAST(:only AS timestamptz[]) IS NULL OR period = ANY(:only))"
        " GROUP BY 1, 2, 3, 4, 5"
    )
    # Groups the live tail may add to (from :tail on; all of them outside a series):
    # one row per group and histogram, its slots summed into one small object.
    _HIST_SQL[_shape] = text(
        "SELECT period, kind, key, which, jsonb_object_agg(slot, n) AS hist "  # noqa: S608
        f"FROM ({_slots.format(cmp='period >= :tail')}) t GROUP BY 1, 2, 3, 4"
    )
    # The past points of a series: nothing is added to them, so PostgreSQL reads their
    # percentiles' slots off the running sum (the rank rule of histogram.percentile).
    _PCT_SQL[_shape] = text(
        "SELECT period, kind, key, which,"  # noqa: S608
        " min(slot) FILTER (WHERE cum >= greatest(1, ceil(0.50 * total))) AS p50,"
        " min(slot) FILTER (WHERE cum >= greatest(1, ceil(0.95 * total))) AS p95,"
        " min(slot) FILTER (WHERE cum >= greatest(1, ceil(0.99 * total))) AS p99"
        " FROM (SELECT period, kind, key, which, slot,"
        " sum(n) OVER (PARTITION BY period, kind, key, which ORDER BY slot) AS cum,"
        " sum(n) OVER (PARTITION BY period, kind, key, which) AS total"
        f" FROM ({_slots.format(cmp='period < :tail')}) h) c"
        " WHERE total > 0 GROUP BY 1, 2, 3, 4"
    )


def _stored_percentiles(target: Sum, row: Any) -> None:
    """A one-row group takes the row's stored percentiles (a row written before they
    were stored has none although it has durations: it is left to the histograms)."""
    for which, prefix, count in (("d", "duration", "duration_count"), ("w", "wait", "wait_count")):
        p50 = getattr(row, f"{prefix}_p50")
        if p50 is None and getattr(row, count):
            continue
        target.fixed[which] = {q: getattr(row, f"{prefix}_{q}") for q in ("p50", "p95", "p99")}


def _ceil_day(at: datetime) -> datetime:
    day = day_of(at)
    return day if day == at else day + DAY


class Source:
    """The rows one answer is built from: stored aggregates up to where the last pass
    reached (less its overlap), and the live tail computed from the runs once per answer.
    Sums (and histograms, where percentiles are shown) are added up in PostgreSQL."""

    def __init__(self, session: AsyncSession, workspace_id: uuid.UUID, w: Window) -> None:
        self.session, self.workspace_id, self.w = session, workspace_id, w
        self._live: dict[Key, Row] | None = None
        self._live_from: datetime | None = None

    async def live_from(self) -> datetime:
        if self._live_from is None:
            position = await cursor(self.session)
            start = hour_of(position - OVERLAP) if position else self.w.since
            self._live_from = min(max(start, self.w.since), self.w.until)
        return self._live_from

    async def live(self) -> dict[Key, Row]:
        if self._live is None:
            start = await self.live_from()
            self._live = (
                await compute(self.session, self.workspace_id, start, self.w.until)
                if start < self.w.until
                else {}
            )
        return self._live

    async def groups(
        self,
        kinds: Iterable[str],
        *,
        series: bool = False,
        key: str | None = None,
        prefix: str | None = None,
        hists: bool = True,
    ) -> dict[Group, Sum]:
        """Sums per (period, kind, key) with `series`, else per (None, kind, key)."""
        wanted = list(kinds)
        w, live_from = self.w, await self.live_from()
        out: dict[Group, Sum] = defaultdict(Sum)
        if live_from > w.since:
            if series and w.granularity == "hour":
                d0 = d1 = live_from  # hour rows throughout
            else:
                d0, d1 = _ceil_day(w.since), day_of(live_from)
                if d0 >= d1:
                    d0 = d1 = live_from
            params: dict[str, Any] = {
                "ws": self.workspace_id, "kinds": wanted, "key": key, "tail": None, "only": None,
                "prefix": f"{prefix}%" if prefix else None,
                "since": w.since, "until": live_from, "d0": d0, "d1": d1,
            }  # fmt: skip
            shape = w.granularity if series else None
            for r in await self.session.execute(_COUNTER_SQL[shape], params):
                target = out[(r.period, r.kind, r.key)]
                target.add(dict(r._mapping), hists=False)
                if series and r.n_rows == 1:
                    _stored_percentiles(target, r)
            if hists and series:
                # Points before the live tail's first period: one row's percentiles are
                # stored with it; for a point of several rows (a week, a month, a day of
                # hour rows at the edge) PostgreSQL reads them off the summed slots. The
                # later points (and whole-window groups) get their histograms.
                tail = params["tail"] = period_of(live_from, w.granularity)
                only = sorted(
                    {p for (p, _, _), part in out.items() if p is not None and p < tail
                     and len(part.fixed) < 2}
                )  # fmt: skip
                if only:
                    for r in await self.session.execute(_PCT_SQL[shape], {**params, "only": only}):
                        out[(r.period, r.kind, r.key)].fixed[r.which] = {
                            "p50": histogram.middle(r.p50),
                            "p95": histogram.middle(r.p95),
                            "p99": histogram.middle(r.p99),
                        }
            if hists:
                for r in await self.session.execute(_HIST_SQL[shape], params):
                    target = out[(r.period, r.kind, r.key)]
                    if r.which == "d":
                        target.duration_hist = r.hist
                    else:
                        target.wait_hist = r.hist
        for (bucket, kind, row_key), row in (await self.live()).items():
            if kind not in wanted:
                continue
            if key is not None and row_key != key and not (prefix and row_key.startswith(prefix)):
                continue
            at = period_of(bucket, w.granularity) if series else None
            out[(at, kind, row_key)].add(row.values(), hists=hists)
        return out


def totals(groups: dict[Group, Sum], kind: str, key: str | None = None) -> Sum:
    s = Sum()
    for (_, k, row_key), part in groups.items():
        if k == kind and (key is None or row_key == key):
            s.merge(part)
    return s


def series(
    groups: dict[Group, Sum], kind: str, key: str | None = None, *, stats: bool = True
) -> list[dict[str, Any]]:
    periods: dict[datetime, Sum] = defaultdict(Sum)
    for (period, k, row_key), part in groups.items():
        if period is not None and k == kind and (key is None or row_key == key):
            periods[period.astimezone(UTC)].merge(part)
    return [{"period": p, **periods[p].stats(quantiles=stats)} for p in sorted(periods)]


def by_key(
    groups: dict[Group, Sum],
    kind: str,
    names: dict[str, str] | None = None,
    *,
    stats: bool = True,
) -> list[dict[str, Any]]:
    keyed: dict[str, Sum] = defaultdict(Sum)
    for (_, k, row_key), part in groups.items():
        if k == kind:
            keyed[row_key].merge(part)
    out = [
        {"key": k, "name": (names or {}).get(k), **s.stats(quantiles=stats)}
        for k, s in keyed.items()
    ]
    out.sort(key=lambda item: (-item["cost_usd"], -item["runs"], item["key"]))
    return out


def failing_nodes(
    groups: dict[Group, Sum], limit: int = 20, workflow: str | None = None
) -> list[dict[str, Any]]:
    counts: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for (_, kind, key), part in groups.items():
        if kind != "failure":
            continue
        workflow_id, node_id, error_class = _split_failure(key)
        if workflow is not None and workflow_id != workflow:
            continue
        counts[(workflow_id, node_id)][error_class] += int(part.values["failed"])
    out: list[dict[str, Any]] = [
        {
            "workflow_id": wf,
            "node_id": node,
            "failures": sum(classes.values()),
            "error_classes": dict(sorted(classes.items(), key=lambda kv: -kv[1])),
        }
        for (wf, node), classes in counts.items()
    ]
    out.sort(key=lambda item: (-item["failures"], item["workflow_id"], item["node_id"]))
    return out[:limit]


def _split_failure(key: str) -> tuple[str, str, str]:
    # <workflow id>/<node id>/<class>: the id has no "/", the class neither; a node id
    # could, so it is whatever lies between.
    workflow_id, _, rest = key.partition("/")
    node_id, _, error_class = rest.rpartition("/")
    return workflow_id, node_id, error_class


async def names(
    session: AsyncSession, workspace_id: uuid.UUID, model: type[Workflow] | type[Agent]
) -> dict[str, str]:
    rows = await session.execute(
        select(model.id, model.name).where(model.workspace_id == workspace_id)
    )
    return {str(i): n for i, n in rows.all()}


def _window_body(w: Window) -> dict[str, Any]:
    return {"since": w.since, "until": w.until, "granularity": w.granularity}


async def overview(session: AsyncSession, workspace_id: uuid.UUID, w: Window) -> dict[str, Any]:
    source = Source(session, workspace_id, w)
    whole = await source.groups(("workspace", "failure", "model"))
    points = await source.groups(("workspace",), series=True)
    return {
        "window": _window_body(w),
        "totals": totals(whole, "workspace").stats(),
        "series": series(points, "workspace"),
        "top_failing_nodes": failing_nodes(whole, limit=10),
        "by_model": by_key(whole, "model"),
    }


async def workflow(
    session: AsyncSession, workspace_id: uuid.UUID, workflow_id: uuid.UUID, w: Window
) -> dict[str, Any]:
    key = str(workflow_id)
    source = Source(session, workspace_id, w)
    whole = await source.groups(("workflow",), key=key)
    failures = await source.groups(("failure",), key=key, prefix=f"{key}/", hists=False)
    points = await source.groups(("workflow",), series=True, key=key)
    return {
        "window": _window_body(w),
        "workflow_id": key,
        "totals": totals(whole, "workflow", key).stats(),
        "series": series(points, "workflow", key),
        "top_failing_nodes": failing_nodes(failures, limit=20, workflow=key),
    }


async def performance(session: AsyncSession, workspace_id: uuid.UUID, w: Window) -> dict[str, Any]:
    source = Source(session, workspace_id, w)
    whole = await source.groups(("workspace", "workflow", "node_type"))
    points = await source.groups(("workspace",), series=True)
    return {
        "window": _window_body(w),
        "totals": totals(whole, "workspace").stats(),
        "series": series(points, "workspace"),
        "by_workflow": by_key(whole, "workflow", await names(session, workspace_id, Workflow)),
        "by_node_type": by_key(whole, "node_type"),
    }


async def usage(session: AsyncSession, workspace_id: uuid.UUID, w: Window) -> dict[str, Any]:
    source = Source(session, workspace_id, w)
    whole = await source.groups(("workspace", "workflow", "model", "agent"))
    points = await source.groups(("workspace",), series=True)
    return {
        "window": _window_body(w),
        "totals": totals(whole, "workspace").stats(),
        "series": series(points, "workspace"),
        "by_workflow": by_key(whole, "workflow", await names(session, workspace_id, Workflow)),
        "by_model": by_key(whole, "model"),
        "by_agent": by_key(whole, "agent", await names(session, workspace_id, Agent)),
    }


def _money(item: dict[str, Any]) -> dict[str, Any]:
    keep = ("key", "name", "period", "runs", "tokens", "cost_usd")
    return {k: item[k] for k in keep if k in item}


async def costs(session: AsyncSession, workspace_id: uuid.UUID, w: Window) -> dict[str, Any]:
    """Tokens and money only: by model, agent, workflow and period, costliest first (no
    percentiles shown, so no histograms read)."""
    source = Source(session, workspace_id, w)
    whole = await source.groups(("workspace", "workflow", "model", "agent"), hists=False)
    points = await source.groups(("workspace",), series=True, hists=False)
    total = totals(whole, "workspace").stats(quantiles=False)
    workflows = await names(session, workspace_id, Workflow)
    agents = await names(session, workspace_id, Agent)
    return {
        "window": _window_body(w),
        "cost_usd": total["cost_usd"],
        "tokens": total["tokens"],
        "series": [_money(p) for p in series(points, "workspace", stats=False)],
        "by_model": [_money(i) for i in by_key(whole, "model", stats=False)],
        "by_agent": [_money(i) for i in by_key(whole, "agent", agents, stats=False)],
        "by_workflow": [_money(i) for i in by_key(whole, "workflow", workflows, stats=False)],
    }


Answer = Callable[[], Awaitable[dict[str, Any]]]


async def cached(
    redis: Redis | None, settings: Settings, parts: Iterable[str], answer: Answer
) -> bytes:
    """`answer()` as JSON, kept in Redis for ANALYTICS__CACHE_TTL_S. Redis down: answered
    without the cache (an analytics page should not fail because a cache did). Bytes all
    the way: a cached answer is sent as it was stored, not parsed and validated again."""
    ttl = settings.analytics.cache_ttl_s
    if redis is None or ttl <= 0:
        return encoded(await answer())
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]
    key = f"analytics:cache:{digest}"
    try:
        hit = await redis.get(key)
        if hit is not None:
            return hit if isinstance(hit, bytes) else str(hit).encode()
    except RedisError as exc:
        log.warning("analytics.cache_unavailable", error=repr(exc))
        return encoded(await answer())
    body = encoded(await answer())
    try:
        await redis.set(key, body, px=int(ttl * 1000))
    except RedisError as exc:
        log.warning("analytics.cache_unavailable", error=repr(exc))
    return body


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def encoded(body: dict[str, Any]) -> bytes:
    """The answer's JSON (times as ISO 8601), written by the json module's C encoder:
    an hourly month is ~720 points, where FastAPI's encoder and response validation
    cost more than computing them. The shapes in schemas.py are what tests check."""
    return json.dumps(body, separators=(",", ":"), default=_default, allow_nan=False).encode()
