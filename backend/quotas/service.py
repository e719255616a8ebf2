"""Quotas per workspace: what each limit is, what has been used, and admitting work
against them.

Limits come from QUOTAS__* settings, overridden per workspace by an operator
(`workspace_quotas`, `python -m backend.quotas`). Usage of the counted quotas (runs per
day, AI tokens and cost per month, tool calls per hour) is a counter in Redis per
workspace and period, reserved atomically (check and add in one script, so parallel
admissions cannot pass one limit together). PostgreSQL is the truth: a counter that is
missing (a Redis flush, a new period) or older than QUOTAS__RECONCILE_S is rebuilt from
the rows before it is used, so a flush never grants a second quota, and a reservation
whose transaction rolled back is forgotten at the next rebuild. Concurrent runs are
counted in PostgreSQL itself (a handful of rows, bounded by the limit).

Run admission (`admit_runs`, called by the lifecycle for every new run):
- API, retry, rerun and webhook runs are refused with QuotaExceeded (402). They take a
  transaction-scoped advisory lock per workspace first, so under it the PostgreSQL
  counts are exact and the counter's rebuild cannot lose a parallel admission.
- Schedule and event runs are skipped instead (None), with the reason in the
  workspace's activity log: an event run is created inside the transaction that closes
  another run, and raising there would undo that close. They take no lock (a dispatch
  may create runs of many workspaces in one transaction; locks there could deadlock).
- Sub-workflow runs are part of their parent's admitted run: not checked, not counted.
A workspace without limits pays nothing: no lock, no Redis call (its limits are
cached in the process for LIMITS_TTL_S).
"""

from __future__ import annotations

import asyncio
import time
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from backend.config import Settings, get_settings
from backend.kit.db import UnitOfWork
from backend.kit.errors import QuotaExceeded, ValidationFailed
from backend.kit.logging import get_logger
from backend.models import ActivityLog, WorkspaceQuota
from backend.quotas import warnings

log = get_logger(__name__)

Period = Literal["hour", "day", "month"]
QUOTAS: dict[str, Period | None] = {
    "runs_per_day": "day",
    "concurrent_runs": None,
    "ai_tokens_per_month": "month",
    "ai_cost_per_month_usd": "month",
    "tool_calls_per_hour": "hour",
    "n8n_toggles_per_day": "day",
    "n8n_refreshes_per_day": "day",
}
# Quotas counted from the activity log: the action each one counts.
ACTIONS = {"n8n_toggles_per_day": "n8n.workflow.toggle",
           "n8n_refreshes_per_day": "n8n.instance.refresh"}  # fmt: skip
LIMITS_TTL_S = 5.0
# Trigger kinds whose runs are skipped, not refused, when started by their trigger.
SKIPPED_TRIGGERS = ("schedule", "event")


def _now() -> datetime:
    return datetime.now(UTC)


def period_bounds(period: Period, now: datetime) -> tuple[datetime, datetime]:
    """The calendar period (UTC) holding `now`: [start, end); `end` is when it resets."""
    now = now.astimezone(UTC)
    if period == "hour":
        start = now.replace(minute=0, second=0, microsecond=0)
        return start, start + timedelta(hours=1)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day, day + timedelta(days=1)
    start = day.replace(day=1)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


# Limits ---------------------------------------------------------------------------------

_limits: OrderedDict[uuid.UUID, tuple[float, dict[str, float | None]]] = OrderedDict()
_LIMITS_MAX = 4096


def forget(workspace_id: uuid.UUID) -> None:
    """Drop this process's cached limits of a workspace (after an override changed)."""
    _limits.pop(workspace_id, None)


def defaults(settings: Settings) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name in QUOTAS:
        # The n8n quotas' defaults live with the other n8n settings (N8N__TOGGLES_PER_DAY).
        group = settings.n8n if name.startswith("n8n_") else settings.quotas
        value = getattr(group, name.removeprefix("n8n_") if group is settings.n8n else name)
        out[name] = None if value is None else float(value)
    return out


async def limits_of(
    session: AsyncSession, workspace_id: uuid.UUID, settings: Settings | None = None
) -> dict[str, float | None]:
    """Every quota's limit for this workspace (None: unlimited)."""
    hit = _limits.get(workspace_id)
    if hit is not None and hit[0] > time.monotonic():
        return hit[1]
    out = defaults(settings or get_settings())
    overrides = await session.scalar(
        select(WorkspaceQuota.limits).where(WorkspaceQuota.workspace_id == workspace_id)
    )
    for name, value in (overrides or {}).items():
        if name in QUOTAS:
            out[name] = None if value is None else float(value)
    _limits[workspace_id] = (time.monotonic() + LIMITS_TTL_S, out)
    if len(_limits) > _LIMITS_MAX:
        _limits.popitem(last=False)
    return out


def check_overrides(values: dict[str, Any]) -> dict[str, float | None]:
    """Operator input for `set_overrides`, checked: known names, null or >= 0."""
    out: dict[str, float | None] = {}
    for name, value in values.items():
        if name not in QUOTAS:
            raise ValidationFailed(
                f"unknown quota {name!r}; one of {', '.join(QUOTAS)}", field=name
            )
        if value is None:
            out[name] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ValidationFailed(f"{name} must be a number >= 0 or null", field=name)
        if value == float("inf"):
            raise ValidationFailed(f"{name} must be finite (null lifts the limit)", field=name)
        out[name] = value
    return out


async def set_overrides(
    session: AsyncSession, workspace_id: uuid.UUID, values: dict[str, Any], *, replace: bool = False
) -> dict[str, Any]:
    """Merge (or with `replace`, set) this workspace's overrides; returns them."""
    checked = check_overrides(values)
    current = await session.scalar(
        select(WorkspaceQuota.limits).where(WorkspaceQuota.workspace_id == workspace_id)
    )
    merged: dict[str, Any] = {} if replace else dict(current or {})
    merged.update(checked)
    await session.execute(
        pg_insert(WorkspaceQuota)
        .values(workspace_id=workspace_id, limits=merged)
        .on_conflict_do_update(
            index_elements=["workspace_id"], set_={"limits": merged, "updated_at": text("now()")}
        )
    )
    forget(workspace_id)
    return merged


# Usage in PostgreSQL (the truth) --------------------------------------------------------

_RUNS_IN = text(
    """
    SELECT count(*) FROM workflow_executions
    WHERE workspace_id = :ws AND created_at >= :start AND created_at < :end
      AND parent_execution_id IS NULL
    """
)
_ACTIVE = text(
    """
    SELECT count(*) FROM workflow_executions
    WHERE workspace_id = :ws AND status IN ('pending', 'running')
      AND parent_execution_id IS NULL
    """
)
# Ended runs carry their totals; unfinished ones only their node rows so far. Sub-runs'
# tokens are already in their parent's node (it adds what its children spent).
_AI = text(
    """
    SELECT coalesce(sum(t), 0) AS tokens, coalesce(sum(c), 0) AS cost FROM (
      SELECT input_tokens + output_tokens AS t, cost_usd AS c
      FROM workflow_executions
      WHERE workspace_id = :ws AND created_at >= :start AND created_at < :end
        AND parent_execution_id IS NULL AND status NOT IN ('pending', 'running')
      UNION ALL
      SELECT n.input_tokens + n.output_tokens, n.cost_usd
      FROM node_executions n JOIN workflow_executions e ON e.id = n.execution_id
      WHERE e.workspace_id = :ws AND e.created_at >= :start AND e.created_at < :end
        AND e.parent_execution_id IS NULL AND e.status IN ('pending', 'running')
      UNION ALL
      SELECT input_tokens + output_tokens, coalesce(cost_usd, 0)
      FROM tool_usage
      WHERE workspace_id = :ws AND created_at >= :start AND created_at < :end
    ) s
    """
)
_ACTIONS = text(
    "SELECT count(*) FROM activity_log "
    "WHERE workspace_id = :ws AND action = :action AND created_at >= :start AND created_at < :end"
)
_TOOL_CALLS = text(
    "SELECT count(*) FROM tool_usage "
    "WHERE workspace_id = :ws AND created_at >= :start AND created_at < :end"
)


async def used_in_db(
    session: AsyncSession, workspace_id: uuid.UUID, name: str, now: datetime
) -> float:
    period = QUOTAS[name]
    if period is None:
        return float(await session.scalar(_ACTIVE, {"ws": workspace_id}) or 0)
    start, end = period_bounds(period, now)
    params = {"ws": workspace_id, "start": start, "end": end}
    if name == "runs_per_day":
        return float(await session.scalar(_RUNS_IN, params) or 0)
    if name == "tool_calls_per_hour":
        return float(await session.scalar(_TOOL_CALLS, params) or 0)
    if name in ACTIONS:
        return float(await session.scalar(_ACTIONS, {**params, "action": ACTIONS[name]}) or 0)
    row = (await session.execute(_AI, params)).one()
    return float(row.tokens if name == "ai_tokens_per_month" else row.cost)


# Counters in Redis ----------------------------------------------------------------------

# KEYS[1] counter hash {v: used, at: rebuilt at (epoch s)}; ARGV: amount, limit ('' for
# none), now, reconcile_s. Answers {-1, 0}: rebuild first; {0, used, at}: refused;
# {1, used, at}: reserved (amount 0 only checks: refused when used >= limit); `at` says
# which rebuild the answer counted on (see _RELEASE).
_RESERVE = """
local h = redis.call('HMGET', KEYS[1], 'v', 'at')
if not h[1] or not h[2] or tonumber(ARGV[3]) - tonumber(h[2]) >= tonumber(ARGV[4]) then
  return {-1, '0'}
end
local used = tonumber(h[1])
local amount = tonumber(ARGV[1])
if ARGV[2] ~= '' then
  local limit = tonumber(ARGV[2])
  if used + amount > limit or (amount == 0 and used >= limit) then
    return {0, h[1], h[2]}
  end
end
if amount == 0 then return {1, h[1], h[2]} end
return {1, redis.call('HINCRBYFLOAT', KEYS[1], 'v', ARGV[1]), h[2]}
"""
# KEYS[1]; ARGV: used (from PostgreSQL), now, ttl_ms.
_REBUILD = """
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'at', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
# KEYS[1]; ARGV: amount (negative), the `at` its reservation was counted on. Only the
# counter that reservation went into moves: one rebuilt since counted from the rows, and
# those never held runs that were not written, so taking them off again would let the
# workspace past its limit.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'at') == ARGV[2] then
  return redis.call('HINCRBYFLOAT', KEYS[1], 'v', ARGV[1])
end
return false
"""
# KEYS[1]; ARGV: amount. Only an existing counter moves (a missing one is rebuilt).
_ADD = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('HINCRBYFLOAT', KEYS[1], 'v', ARGV[1])
end
return false
"""

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Redis] = weakref.WeakKeyDictionary()


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def redis_client() -> Redis:
    """One client per event loop (the API's, a worker process's, a test's)."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        settings = get_settings()
        client = _clients[loop] = Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.redis.socket_timeout_s,
            socket_connect_timeout=settings.redis.socket_connect_timeout_s,
        )
    return client


def counter_key(workspace_id: uuid.UUID, name: str, now: datetime) -> str:
    period = QUOTAS[name]
    assert period is not None
    start, _ = period_bounds(period, now)
    return f"quota:{workspace_id}:{name}:{int(start.timestamp())}"


@dataclass
class Verdict:
    ok: bool
    used: float
    # The counter's rebuild stamp the answer came from (None: decided from the rows).
    counted_on: str | None = None


async def _reserve(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    name: str,
    amount: float,
    limit: float | None,
    settings: Settings,
    now: datetime,
) -> Verdict:
    """Check `used + amount` against `limit` and add `amount`, atomically (`used`: after
    the reservation), and warn the workspace's admins when that crossed a warning
    threshold (arithmetic on the answer: no call when nothing was crossed)."""
    verdict = await _reserve_once(session, workspace_id, name, amount, limit, settings, now)
    if amount > 0 and limit is not None and settings.quotas.warn_at_percent:
        if verdict.ok:
            before, after = verdict.used - amount, verdict.used
        else:  # a refusal: the limit is reached, whatever the counter says
            before, after = verdict.used, max(verdict.used, limit)
        period = QUOTAS[name]
        assert period is not None
        start, end = period_bounds(period, now)
        warnings.signal(
            settings, workspace_id, name, limit, before, after, start, end, used=verdict.used
        )
    return verdict


async def _reserve_once(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    name: str,
    amount: float,
    limit: float | None,
    settings: Settings,
    now: datetime,
) -> Verdict:
    """`_reserve` without the warnings, rebuilding the counter from PostgreSQL first
    when it is missing or stale. Redis down: the PostgreSQL figure decides (slower,
    never more permissive)."""
    key = counter_key(workspace_id, name, now)
    period = QUOTAS[name]
    assert period is not None
    _, end = period_bounds(period, now)
    limit_arg = "" if limit is None else repr(float(limit))
    stamp = repr(now.timestamp())
    try:
        redis = redis_client()
        for _ in range(2):
            code, used, *counted_on = await redis.eval(
                _RESERVE, 1, key, repr(float(amount)), limit_arg, stamp,
                str(settings.quotas.reconcile_s),
            )  # fmt: skip
            if int(code) >= 0:
                return Verdict(int(code) == 1, float(used), _text(counted_on[0]))
            fresh = await used_in_db(session, workspace_id, name, now)
            # Kept a day past its period, so a late release or spend finds it.
            ttl_ms = int(((end - now).total_seconds() + 86_400) * 1000)
            await redis.eval(_REBUILD, 1, key, repr(fresh), stamp, str(ttl_ms))
    except RedisError as exc:
        log.warning("quotas.redis_unavailable", error=repr(exc), quota=name)
    used_now = await used_in_db(session, workspace_id, name, now)
    if limit is None:
        return Verdict(True, used_now + amount)
    ok = used_now + amount <= limit and not (amount == 0 and used_now >= limit)
    return Verdict(ok, used_now + amount if ok else used_now)


async def _add(workspace_id: uuid.UUID, name: str, amount: float, now: datetime) -> float | None:
    """Move an existing counter; its new value (None: no counter, or Redis down)."""
    if not amount:
        return None
    try:
        value = await redis_client().eval(
            _ADD, 1, counter_key(workspace_id, name, now), repr(float(amount))
        )
    except RedisError as exc:
        # The next rebuild (at most QUOTAS__RECONCILE_S away) reads it from the rows.
        log.warning("quotas.redis_unavailable", error=repr(exc), quota=name)
        return None
    return None if value is None else float(value)


def _refusal(name: str, limit: float, used: float, now: datetime) -> QuotaExceeded:
    period = QUOTAS[name]
    resets_at = period_bounds(period, now)[1].isoformat() if period else None
    when = f"; resets at {resets_at}" if resets_at else "; frees up as runs end"
    shown = int(limit) if float(limit).is_integer() else limit
    return QuotaExceeded(
        f"quota {name} exceeded: limit {shown}, used {_shown(used)}{when}",
        quota=name,
        limit=shown,
        used=_shown(used),
        resets_at=resets_at,
    )


def _shown(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(value, 6)


# Admission --------------------------------------------------------------------------------


@dataclass
class Admission:
    """Runs let in by `admit_runs`; `release(n)` gives back what was reserved for runs
    that were not created after all (an idempotency key that already had its run)."""

    workspace_id: uuid.UUID | None = None
    reserved: int = 0
    at: datetime | None = None
    # The counter rebuild the reservation went into (Verdict.counted_on).
    counted_on: str | None = None

    async def release(self, count: int) -> None:
        count = min(count, self.reserved)
        if count <= 0 or self.workspace_id is None or self.at is None:
            return
        self.reserved -= count
        if self.counted_on is None:
            return  # decided from the rows (Redis was down): nothing was added
        key = counter_key(self.workspace_id, "runs_per_day", self.at)
        try:
            await redis_client().eval(_RELEASE, 1, key, repr(float(-count)), self.counted_on)
        except RedisError as exc:
            # Too strict until the next rebuild (at most QUOTAS__RECONCILE_S away).
            log.warning("quotas.redis_unavailable", error=repr(exc), quota="runs_per_day")

    def hold_until_commit(self, uow: UnitOfWork) -> None:
        """Give the places back if `uow` does not commit (its runs were never written:
        a failed insert, a request that failed after it): a reservation that outlived
        its rolled-back runs counted against the workspace until the day ended."""
        if self.reserved > 0:
            uow.on_rollback(lambda: self.release(self.reserved))


FREE = Admission()


def mode_of(trigger_type: str, actor: str | None, sub_run: bool) -> str:
    """refuse | skip | exempt, from how the lifecycle was asked to create the run."""
    if sub_run:
        return "exempt"
    if trigger_type in SKIPPED_TRIGGERS and (actor or "").startswith("trigger:"):
        return "skip"
    return "refuse"


async def admit_runs(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    count: int,
    *,
    trigger_type: str,
    actor: str | None,
    values: dict[str, Any],
    settings: Settings | None = None,
) -> Admission | None:
    """Let `count` new runs in, or refuse (QuotaExceeded), or for a schedule or event run
    skip (None, with the reason recorded in the activity log)."""
    mode = mode_of(trigger_type, actor, values.get("parent_execution_id") is not None)
    if mode == "exempt" or count <= 0:
        return FREE
    settings = settings or get_settings()
    limits = await limits_of(session, workspace_id, settings)
    per_day, concurrent = limits["runs_per_day"], limits["concurrent_runs"]
    if per_day is None and concurrent is None:
        return FREE
    now = _now()
    if mode == "refuse":
        await session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext('quota:' || :ws))"),
            {"ws": str(workspace_id)},
        )
    refusal: QuotaExceeded | None = None
    if concurrent is not None:
        active = await used_in_db(session, workspace_id, "concurrent_runs", now)
        if active + count > concurrent:
            refusal = _refusal("concurrent_runs", concurrent, active, now)
    admission = Admission(workspace_id, 0, now)
    if refusal is None and per_day is not None:
        verdict = await _reserve(
            session, workspace_id, "runs_per_day", count, per_day, settings, now
        )
        if verdict.ok:
            admission.reserved, admission.counted_on = count, verdict.counted_on
        else:
            refusal = _refusal("runs_per_day", per_day, verdict.used, now)
    if refusal is None:
        return admission
    if mode == "refuse":
        raise refusal
    _record_skip(session, workspace_id, trigger_type, values, refusal)
    return None


def _record_skip(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    trigger_type: str,
    values: dict[str, Any],
    refusal: QuotaExceeded,
) -> None:
    trigger_id = values.get("trigger_id")
    details = {
        "trigger_type": trigger_type,
        "detail": refusal.detail,
        **refusal.extra,
        **{k: str(v) for k in ("scheduled_for", "idempotency_key") if (v := values.get(k))},
    }
    log.warning(
        "quotas.run_skipped", workspace_id=str(workspace_id), trigger_id=str(trigger_id), **details
    )
    session.add(
        ActivityLog(
            workspace_id=workspace_id,
            action="quota.run_skipped",
            resource_type="trigger",
            resource_id=str(trigger_id) if trigger_id else None,
            details=details,
        )
    )


async def check_ai(
    session: AsyncSession, workspace_id: uuid.UUID, settings: Settings | None = None
) -> None:
    """Before an agent calls the model: QuotaExceeded once this month's tokens or cost
    reached the limit. (A call let in may cross it; the next one is refused.)"""
    settings = settings or get_settings()
    limits = await limits_of(session, workspace_id, settings)
    now = _now()
    for name in ("ai_tokens_per_month", "ai_cost_per_month_usd"):
        limit = limits[name]
        if limit is None:
            continue
        verdict = await _reserve(session, workspace_id, name, 0, limit, settings, now)
        if not verdict.ok:
            raise _refusal(name, limit, verdict.used, now)


async def spend_ai(workspace_id: uuid.UUID, tokens: int, cost_usd: float) -> None:
    """After a model call: what it spent, added to this month's counters (no Redis call
    when this process knows the workspace has no AI quota)."""
    hit = _limits.get(workspace_id)
    if hit is not None and all(
        hit[1][name] is None for name in ("ai_tokens_per_month", "ai_cost_per_month_usd")
    ):
        return
    now = _now()
    settings = get_settings()
    for name, amount in (("ai_tokens_per_month", tokens), ("ai_cost_per_month_usd", cost_usd)):
        after = await _add(workspace_id, name, amount, now)
        # The limits check_ai read before the call (kept past their TTL: a warning
        # may go by limits a few seconds old; admission never does).
        limit = hit[1][name] if hit is not None else None
        if after is not None and limit is not None and settings.quotas.warn_at_percent:
            start, end = period_bounds("month", now)
            warnings.signal(settings, workspace_id, name, limit, after - amount, after, start, end)


async def admit_tool_calls(
    session: AsyncSession, workspace_id: uuid.UUID, count: int = 1, settings: Settings | None = None
) -> None:
    """Before a call of the tools API: reserve it against tool_calls_per_hour, or
    QuotaExceeded. (The call's tool_usage row is what the counter is rebuilt from.)"""
    settings = settings or get_settings()
    limit = (await limits_of(session, workspace_id, settings))["tool_calls_per_hour"]
    if limit is None:
        return
    now = _now()
    verdict = await _reserve(
        session, workspace_id, "tool_calls_per_hour", count, limit, settings, now
    )
    if not verdict.ok:
        raise _refusal("tool_calls_per_hour", limit, verdict.used, now)


def own_limit(workspace_settings: Any, name: str) -> float | None:
    """A limit the workspace's administrators set for themselves in its settings
    (`{"quotas": {name: n}}`); it can only lower the operator's, never lift it."""
    mine = workspace_settings.get("quotas") if isinstance(workspace_settings, dict) else None
    value = mine.get(name) if isinstance(mine, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        return None
    return float(value) if value != float("inf") else None


async def admit_action(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    name: str,
    *,
    workspace_settings: Any = None,
    settings: Settings | None = None,
) -> None:
    """Before an action a daily quota counts (the n8n toggles and refreshes, counted
    from the activity log rows they write): reserve one, or QuotaExceeded (402). The
    limit is the operator's, or the workspace's own when that is lower."""
    settings = settings or get_settings()
    limit = (await limits_of(session, workspace_id, settings))[name]
    own = own_limit(workspace_settings, name)
    if own is not None and (limit is None or own < limit):
        limit = own
    if limit is None:
        return
    now = _now()
    verdict = await _reserve(session, workspace_id, name, 1, limit, settings, now)
    if not verdict.ok:
        raise _refusal(name, limit, verdict.used, now)


# Reading ----------------------------------------------------------------------------------


async def usage(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    settings: Settings | None = None,
    workspace_settings: Any = None,
) -> list[dict[str, Any]]:
    """Each quota: its limit, what is used, what remains, and when it resets."""
    settings = settings or get_settings()
    limits = dict(await limits_of(session, workspace_id, settings))
    for name in ACTIONS:
        own, current = own_limit(workspace_settings, name), limits[name]
        if own is not None and (current is None or own < current):
            limits[name] = own
    now = _now()
    out = []
    for name, period in QUOTAS.items():
        limit = limits[name]
        if period is None:
            used = await used_in_db(session, workspace_id, name, now)
        else:
            used = (await _reserve(session, workspace_id, name, 0, None, settings, now)).used
        out.append(
            {
                "quota": name,
                "period": period or "concurrent",
                "limit": None if limit is None else _shown(limit),
                "used": _shown(used),
                "remaining": None if limit is None else _shown(max(0.0, limit - used)),
                "exceeded": limit is not None and used >= limit,
                "resets_at": period_bounds(period, now)[1] if period else None,
            }
        )
    return out
