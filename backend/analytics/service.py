"""Answers of the analytics API: stored hourly aggregates for the hours the last pass
covered, plus the live tail computed from the runs themselves, summed into totals,
series and breakdowns; each answer kept briefly in Redis."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from fastapi.encoders import jsonable_encoder
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from backend.analytics import histogram
from backend.analytics.aggregate import HOUR, OVERLAP, compute, cursor, hour_of
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


class Sum:
    """Aggregate rows added together."""

    def __init__(self) -> None:
        self.values: dict[str, float] = dict.fromkeys(_SUMS, 0)
        self.duration_hist: dict[str, int] = {}
        self.wait_hist: dict[str, int] = {}

    def add(self, row: dict[str, Any], hists: bool = True) -> None:
        v = self.values
        for name in _SUMS:
            v[name] += row[name] or 0
        if hists:
            histogram.merge(self.duration_hist, row["duration_hist"] or {})
            histogram.merge(self.wait_hist, row["wait_hist"] or {})

    def stats(self) -> dict[str, Any]:
        v = self.values
        ended = v["completed"] + v["failed"] + v["cancelled"]
        return {
            "runs": int(v["runs"]),
            "by_status": {s: int(v[s]) for s in STATUSES},
            "success_rate": round(v["completed"] / ended, 4) if ended else None,
            "duration_ms": {
                "mean": round(v["duration_sum_ms"] / v["duration_count"], 3)
                if v["duration_count"]
                else None,
                **histogram.quantiles(self.duration_hist),
            },
            "queue_wait_ms": {
                "mean": round(v["wait_sum_ms"] / v["wait_count"], 3) if v["wait_count"] else None,
                **histogram.quantiles(self.wait_hist),
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


_STORED = text(
    """
    SELECT bucket, kind, key, runs, pending, running, completed, failed, cancelled,
           duration_count, duration_sum_ms, duration_hist, wait_count, wait_sum_ms,
           wait_hist, retries, input_tokens, output_tokens, cache_read_tokens,
           cache_write_tokens, cost_usd
    FROM analytics_aggregates
    WHERE workspace_id = :ws AND bucket >= :since AND bucket < :until
      AND kind = ANY(:kinds)
    """
)


async def rows_for(
    session: AsyncSession, workspace_id: uuid.UUID, w: Window, kinds: Iterable[str]
) -> list[dict[str, Any]]:
    """The aggregate rows of the window: stored ones up to where the last pass reached
    (less its overlap), the rest computed live from the runs."""
    wanted = list(kinds)
    position = await cursor(session)
    live_from = hour_of(position - OVERLAP) if position else w.since
    live_from = min(max(live_from, w.since), w.until)
    out: list[dict[str, Any]] = []
    if live_from > w.since:
        result = await session.execute(
            _STORED, {"ws": workspace_id, "since": w.since, "until": live_from, "kinds": wanted}
        )
        out = [dict(r._mapping) for r in result]
    if live_from < w.until:
        live = await compute(session, workspace_id, live_from, w.until)
        for (bucket, kind, key), row in live.items():
            if kind in wanted:
                out.append({"bucket": bucket, "kind": kind, "key": key, **row.values()})
    return out


def totals(rows: Iterable[dict[str, Any]], kind: str, key: str | None = None) -> Sum:
    s = Sum()
    for r in rows:
        if r["kind"] == kind and (key is None or r["key"] == key):
            s.add(r)
    return s


def series(
    rows: Iterable[dict[str, Any]], kind: str, w: Window, key: str | None = None
) -> list[dict[str, Any]]:
    periods: dict[datetime, Sum] = defaultdict(Sum)
    for r in rows:
        if r["kind"] == kind and (key is None or r["key"] == key):
            periods[period_of(r["bucket"], w.granularity)].add(r)
    return [{"period": p, **periods[p].stats()} for p in sorted(periods)]


def by_key(
    rows: Iterable[dict[str, Any]], kind: str, names: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    keyed: dict[str, Sum] = defaultdict(Sum)
    for r in rows:
        if r["kind"] == kind:
            keyed[r["key"]].add(r)
    out = [{"key": k, "name": (names or {}).get(k), **s.stats()} for k, s in keyed.items()]
    out.sort(key=lambda item: (-item["cost_usd"], -item["runs"], item["key"]))
    return out


def failing_nodes(
    rows: Iterable[dict[str, Any]], limit: int = 20, workflow: str | None = None
) -> list[dict[str, Any]]:
    counts: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in rows:
        if r["kind"] != "failure":
            continue
        workflow_id, node_id, error_class = _split_failure(r["key"])
        if workflow is not None and workflow_id != workflow:
            continue
        counts[(workflow_id, node_id)][error_class] += int(r["failed"])
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
    rows = await rows_for(session, workspace_id, w, ("workspace", "failure", "model"))
    return {
        "window": _window_body(w),
        "totals": totals(rows, "workspace").stats(),
        "series": series(rows, "workspace", w),
        "top_failing_nodes": failing_nodes(rows, limit=10),
        "by_model": by_key(rows, "model"),
    }


async def workflow(
    session: AsyncSession, workspace_id: uuid.UUID, workflow_id: uuid.UUID, w: Window
) -> dict[str, Any]:
    rows = await rows_for(session, workspace_id, w, ("workflow", "failure"))
    key = str(workflow_id)
    return {
        "window": _window_body(w),
        "workflow_id": key,
        "totals": totals(rows, "workflow", key).stats(),
        "series": series(rows, "workflow", w, key),
        "top_failing_nodes": failing_nodes(rows, limit=20, workflow=key),
    }


async def performance(session: AsyncSession, workspace_id: uuid.UUID, w: Window) -> dict[str, Any]:
    rows = await rows_for(session, workspace_id, w, ("workspace", "workflow", "node_type"))
    return {
        "window": _window_body(w),
        "totals": totals(rows, "workspace").stats(),
        "series": series(rows, "workspace", w),
        "by_workflow": by_key(rows, "workflow", await names(session, workspace_id, Workflow)),
        "by_node_type": by_key(rows, "node_type"),
    }


async def usage(session: AsyncSession, workspace_id: uuid.UUID, w: Window) -> dict[str, Any]:
    rows = await rows_for(session, workspace_id, w, ("workspace", "workflow", "model", "agent"))
    return {
        "window": _window_body(w),
        "totals": totals(rows, "workspace").stats(),
        "series": series(rows, "workspace", w),
        "by_workflow": by_key(rows, "workflow", await names(session, workspace_id, Workflow)),
        "by_model": by_key(rows, "model"),
        "by_agent": by_key(rows, "agent", await names(session, workspace_id, Agent)),
    }


def _money(item: dict[str, Any]) -> dict[str, Any]:
    keep = ("key", "name", "period", "runs", "tokens", "cost_usd")
    return {k: item[k] for k in keep if k in item}


async def costs(session: AsyncSession, workspace_id: uuid.UUID, w: Window) -> dict[str, Any]:
    """Tokens and money only: by model, agent, workflow and period, costliest first."""
    body = await usage(session, workspace_id, w)
    return {
        "window": body["window"],
        "cost_usd": body["totals"]["cost_usd"],
        "tokens": body["totals"]["tokens"],
        "series": [_money(p) for p in body["series"]],
        "by_model": [_money(i) for i in body["by_model"]],
        "by_agent": [_money(i) for i in body["by_agent"]],
        "by_workflow": [_money(i) for i in body["by_workflow"]],
    }


Answer = Callable[[], Awaitable[dict[str, Any]]]


async def cached(
    redis: Redis | None, settings: Settings, parts: Iterable[str], answer: Answer
) -> dict[str, Any]:
    """`answer()`, kept in Redis for ANALYTICS__CACHE_TTL_S. Redis down: answered
    without the cache (an analytics page should not fail because a cache did)."""
    ttl = settings.analytics.cache_ttl_s
    if redis is None or ttl <= 0:
        return _encoded(await answer())
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]
    key = f"analytics:cache:{digest}"
    try:
        hit = await redis.get(key)
        if hit is not None:
            loaded: dict[str, Any] = json.loads(hit)
            return loaded
    except RedisError as exc:
        log.warning("analytics.cache_unavailable", error=repr(exc))
        return _encoded(await answer())
    body = _encoded(await answer())
    try:
        await redis.set(key, json.dumps(body, separators=(",", ":")), px=int(ttl * 1000))
    except RedisError as exc:
        log.warning("analytics.cache_unavailable", error=repr(exc))
    return body


def _encoded(body: dict[str, Any]) -> dict[str, Any]:
    # Cached or not, an answer is the same JSON (times as ISO 8601 strings).
    encoded: dict[str, Any] = jsonable_encoder(body)
    return encoded
