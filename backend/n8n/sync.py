"""Copying an instance's workflows and recent executions into our database.

A sync claims the instance (`sync_claimed_until`, taken with SKIP LOCKED, so two beats or
a beat and a refresh never sync one instance at once, and a crashed sync's claim runs
out), reads from n8n with no transaction open (beat's path), then applies what it read in
one transaction:

- workflows: the whole list (n8n has no "changed since" filter), upserted by n8n id;
  the ones no longer listed are removed;
- executions: incrementally, `startedAfter` the instance's cursor, moved back to the
  oldest execution we still hold as unfinished so its end is seen; failed ones get their
  error message and failing node from `GET /executions/{id}?includeData=true` (bounded
  per sync). n8n lists newest first, so a burst larger than N8N__MAX_EXECUTION_PAGES
  pages leaves older executions unread: the page cursor where the read stopped is kept
  (`capabilities.execution_backlog`, with the query it belongs to) and the next syncs
  continue from it, up to that many pages more each, until the gap is closed; more than
  MAX_BACKLOG gaps at once and the oldest is given up, counted in
  `capabilities.executions_skipped` (never silently).

A sync that cannot reach the instance (or is refused) leaves the reason on the
instance's status and keeps everything synced before.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from backend.config import Settings
from backend.kit.logging import get_logger
from backend.models import N8nExecution, N8nInstance, N8nWorkflow
from backend.n8n import client as n8n
from backend.n8n.api_types import FAILED_STATUSES, UNFINISHED_STATUSES, Execution, Workflow

log = get_logger(__name__)
OVERLAP = timedelta(seconds=1)
# Unread stretches of executions remembered at once (see the module's doc).
MAX_BACKLOG = 10


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _text(value: Any, limit: int) -> str | None:
    return str(value)[:limit] if value not in (None, "") else None


def apply_workflow(row: N8nWorkflow, wf: Workflow) -> None:
    """Our copy of one workflow from n8n's answer (pinned data is never kept)."""
    now = datetime.now(UTC)
    settings = wf.get("settings") or {}
    nodes = wf.get("nodes") or []
    if "name" in wf:
        row.name = str(wf["name"])[:500]
    if "active" in wf:
        row.active = bool(wf["active"])
    row.archived = bool(wf.get("isArchived", False))
    if "tags" in wf:
        row.tags = [
            str(t.get("name", ""))[:200] for t in wf.get("tags") or [] if isinstance(t, dict)
        ]
    row.version_id = _text(wf.get("versionId"), 64)
    if "nodes" in wf:
        row.node_count = len(nodes)
        row.definition = {
            "nodes": nodes,
            "connections": wf.get("connections") or {},
            "settings": settings,
        }
    row.error_workflow = _text(
        settings.get("errorWorkflow") if isinstance(settings, dict) else None, 64
    )
    row.n8n_created_at = parse_time(wf.get("createdAt")) or row.n8n_created_at
    row.n8n_updated_at = parse_time(wf.get("updatedAt")) or row.n8n_updated_at
    row.synced_at = now


def error_of(execution: Execution) -> tuple[str | None, str | None]:
    """(message, failing node) from an execution read with includeData=true."""
    data = execution.get("data") or {}
    result = data.get("resultData") if isinstance(data, dict) else None
    if not isinstance(result, dict):
        return None, None
    raw = result.get("error")
    error: dict[str, Any] = raw if isinstance(raw, dict) else {}
    node = error.get("node")
    node_name = node.get("name") if isinstance(node, dict) else node
    message = error.get("message") or error.get("description")
    return (
        _text(message, 4000),
        _text(node_name or result.get("lastNodeExecuted"), 500),
    )


# Reading from n8n -------------------------------------------------------------------------


@dataclass
class Snapshot:
    """What a sync needs from the row, read in the claiming transaction."""

    instance_id: uuid.UUID
    base_url: str
    api_key: str
    legacy_publish: bool | None
    started_after: datetime
    # Failed executions we already know the error of (no second detail call).
    known_errors: frozenset[str]
    # Where earlier syncs stopped reading: [{"started_after": iso, "cursor": str}].
    backlog: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Fetched:
    workflows: list[Workflow] = field(default_factory=list)
    executions: list[Execution] = field(default_factory=list)
    details: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    legacy_publish: bool | None = None
    failure: n8n.N8nFailure | None = None
    # The unread stretches after this sync, and how many were given up on.
    backlog: list[dict[str, str]] = field(default_factory=list)
    skipped: int = 0


async def snapshot(session: AsyncSession, settings: Settings, instance: N8nInstance) -> Snapshot:
    from backend.n8n.service import secrets_of

    now = datetime.now(UTC)
    start = instance.executions_after or now - timedelta(days=settings.n8n.executions_lookback_days)
    oldest_open = await session.scalar(
        select(func.min(N8nExecution.started_at)).where(
            N8nExecution.instance_id == instance.id,
            N8nExecution.status.in_(UNFINISHED_STATUSES),
            N8nExecution.started_at >= now - timedelta(days=settings.n8n.executions_lookback_days),
        )
    )
    if oldest_open is not None and oldest_open < start:
        start = oldest_open
    known = await session.scalars(
        select(N8nExecution.n8n_id).where(
            N8nExecution.instance_id == instance.id,
            N8nExecution.error_message.is_not(None),
            N8nExecution.started_at >= start - OVERLAP,
        )
    )
    legacy = instance.capabilities.get("legacy_publish")
    return Snapshot(
        instance_id=instance.id,
        base_url=instance.base_url,
        api_key=secrets_of(settings, instance).api_key,
        legacy_publish=legacy if isinstance(legacy, bool) else None,
        started_after=start - OVERLAP,
        known_errors=frozenset(known.all()),
        backlog=_backlog_of(instance),
    )


def _backlog_of(instance: N8nInstance) -> list[dict[str, str]]:
    raw = instance.capabilities.get("execution_backlog")
    out: list[dict[str, str]] = []
    for item in raw if isinstance(raw, list) else []:
        if isinstance(item, dict) and isinstance(item.get("cursor"), str):
            after = item.get("started_after")
            out.append({"started_after": str(after or ""), "cursor": item["cursor"]})
    return out


async def _read_executions(
    api: n8n.N8nClient, started_after: str, cursor: str | None, max_pages: int
) -> tuple[list[Execution], str | None]:
    """Up to max_pages pages of executions (newest first) from `cursor`; with the
    cursor to continue from when pages remain (None: read to the end)."""
    out: list[Execution] = []
    for _ in range(max_pages):
        params: dict[str, Any] = {"includeData": "false", "startedAfter": started_after or None,
                                  "limit": api.conf.page_size, "cursor": cursor}  # fmt: skip
        page = await api.request("GET", "/executions", params=params)
        data = page.get("data") if isinstance(page, dict) else None
        if not isinstance(data, list):
            raise n8n.N8nFailure("n8n's answer to GET /executions has no `data` list")
        out += [item for item in data if isinstance(item, dict)]  # type: ignore[misc]
        cursor = page.get("nextCursor") or None
        if cursor is None:
            return out, None
    return out, cursor


async def fetch(settings: Settings, snap: Snapshot) -> Fetched:
    out = Fetched()
    conf = settings.n8n
    try:
        async with n8n.client_for(
            settings, snap.base_url, snap.api_key, legacy_publish=snap.legacy_publish
        ) as api:
            out.workflows = await api.workflows()
            after = snap.started_after.astimezone(UTC).isoformat()
            fresh, rest = await _read_executions(api, after, None, conf.max_execution_pages)
            out.executions += fresh
            # Older stretches earlier syncs could not finish, oldest gap first.
            backlog = list(snap.backlog)
            still: list[dict[str, str]] = []
            for gap in backlog:
                older, more = await _read_executions(
                    api, gap["started_after"], gap["cursor"], conf.max_execution_pages
                )
                out.executions += older
                if more is not None:
                    still.append({**gap, "cursor": more})
            if rest is not None:
                still.append({"started_after": after, "cursor": rest})
            out.skipped = max(0, len(still) - MAX_BACKLOG)
            out.backlog = still[out.skipped :]
            budget = conf.error_details_per_sync
            for execution in out.executions:
                eid = str(execution.get("id") or "")
                if budget <= 0:
                    break
                if execution.get("status") not in FAILED_STATUSES or eid in snap.known_errors:
                    continue
                budget -= 1
                try:
                    full = await api.execution(eid, include_data=True)
                except (n8n.Missing, n8n.Forbidden, n8n.Rejected):
                    continue
                out.details[eid] = error_of(full)
            out.legacy_publish = api.legacy_publish
    except n8n.N8nFailure as exc:
        out.failure = exc
    return out


# Writing what was read --------------------------------------------------------------------


@dataclass
class Outcome:
    ok: bool
    status: str
    reason: str | None
    workflows: int = 0
    workflows_removed: int = 0
    executions: int = 0
    busy: bool = False
    # Older executions remain to be read; the next sync continues.
    executions_pending: bool = False


async def upsert_workflows(
    session: AsyncSession, instance: N8nInstance, workflows: Sequence[Workflow]
) -> tuple[int, int]:
    existing = {
        w.n8n_id: w
        for w in await session.scalars(
            select(N8nWorkflow).where(N8nWorkflow.instance_id == instance.id)
        )
    }
    seen: set[str] = set()
    for wf in workflows:
        wid = str(wf.get("id") or "")[:64]
        if not wid or wid in seen:
            continue
        seen.add(wid)
        row = existing.get(wid)
        if row is None:
            row = N8nWorkflow(
                id=uuid.uuid4(),
                workspace_id=instance.workspace_id,
                instance_id=instance.id,
                n8n_id=wid,
                name="",
                active=False,
                tags=[],
                node_count=0,
                definition={},
            )
            session.add(row)
        apply_workflow(row, wf)
    gone = [w for w in existing if w not in seen]
    if gone:
        await session.execute(
            delete(N8nWorkflow).where(
                N8nWorkflow.instance_id == instance.id, N8nWorkflow.n8n_id.in_(gone)
            )
        )
    await session.flush()
    return len(seen), len(gone)


async def upsert_executions(
    session: AsyncSession,
    instance: N8nInstance,
    executions: Sequence[Execution],
    details: dict[str, tuple[str | None, str | None]],
) -> list[N8nExecution]:
    if not executions:
        return []
    workflow_ids = {
        n8n_id: row_id
        for n8n_id, row_id in (
            await session.execute(
                select(N8nWorkflow.n8n_id, N8nWorkflow.id).where(
                    N8nWorkflow.instance_id == instance.id
                )
            )
        ).all()
    }
    rows: dict[str, dict[str, Any]] = {}
    for ex in executions:
        eid = str(ex.get("id") or "")[:64]
        if not eid:
            continue
        wid = _text(ex.get("workflowId"), 64)
        message, node = details.get(eid, (None, None))
        rows[eid] = {
            "id": uuid.uuid4(),
            "workspace_id": instance.workspace_id,
            "instance_id": instance.id,
            "n8n_id": eid,
            "workflow_n8n_id": wid,
            "workflow_id": workflow_ids.get(wid or ""),
            "status": str(ex.get("status") or "unknown")[:20],
            "mode": _text(ex.get("mode"), 30),
            "finished": bool(ex.get("finished", False)),
            "started_at": parse_time(ex.get("startedAt")),
            "stopped_at": parse_time(ex.get("stoppedAt")),
            "retry_of": _text(ex.get("retryOf"), 64),
            "error_message": message,
            "failed_node": node,
        }
    insert = pg_insert(N8nExecution).values(list(rows.values()))
    excluded = insert.excluded
    stmt = insert.on_conflict_do_update(
        index_elements=["instance_id", "n8n_id"],
        set_={
            "workflow_n8n_id": excluded.workflow_n8n_id,
            "workflow_id": excluded.workflow_id,
            "status": excluded.status,
            "mode": excluded.mode,
            "finished": excluded.finished,
            "started_at": func.coalesce(excluded.started_at, N8nExecution.started_at),
            "stopped_at": excluded.stopped_at,
            "retry_of": func.coalesce(excluded.retry_of, N8nExecution.retry_of),
            # An error learned from the intake or an earlier detail call stays.
            "error_message": func.coalesce(excluded.error_message, N8nExecution.error_message),
            "failed_node": func.coalesce(excluded.failed_node, N8nExecution.failed_node),
            "updated_at": func.now(),
        },
    ).returning(N8nExecution)
    result = await session.scalars(stmt, execution_options={"populate_existing": True})
    return list(result.all())


async def apply(
    session: AsyncSession, instance: N8nInstance, snap: Snapshot, fetched: Fetched
) -> Outcome:
    now = datetime.now(UTC)
    instance.sync_claimed_until = None
    instance.last_synced_at = now
    if fetched.failure is not None:
        exc = fetched.failure
        instance.status, instance.status_reason = exc.kind, exc.message[:2000]
        instance.sync_error = exc.message[:2000]
        instance.last_checked_at = now
        await session.flush()
        return Outcome(ok=False, status=exc.kind, reason=exc.message)
    count, removed = await upsert_workflows(session, instance, fetched.workflows)
    await upsert_executions(session, instance, fetched.executions, fetched.details)
    starts = [t for t in (parse_time(e.get("startedAt")) for e in fetched.executions) if t]
    if starts:
        instance.executions_after = max(max(starts), snap.started_after + OVERLAP)
    elif instance.executions_after is None:
        instance.executions_after = snap.started_after + OVERLAP
    if fetched.legacy_publish is not None:
        instance.capabilities = {**instance.capabilities, "legacy_publish": fetched.legacy_publish}
    skipped = int(instance.capabilities.get("executions_skipped") or 0) + fetched.skipped
    instance.capabilities = {**instance.capabilities, "execution_backlog": fetched.backlog,
                             "executions_skipped": skipped}  # fmt: skip
    if fetched.skipped:
        log.warning("n8n.executions_skipped", instance_id=str(instance.id), gaps=fetched.skipped)
    instance.status, instance.status_reason, instance.sync_error = "ok", None, None
    instance.last_checked_at = now
    await session.flush()
    return Outcome(
        ok=True,
        status="ok",
        reason=None,
        workflows=count,
        workflows_removed=removed,
        executions=len(fetched.executions),
        executions_pending=bool(fetched.backlog),
    )


# Claims -----------------------------------------------------------------------------------


async def claim(session: AsyncSession, settings: Settings, instance_id: uuid.UUID) -> bool:
    """Take the instance for one sync, unless another sync holds it."""
    now = datetime.now(UTC)
    free = (
        select(N8nInstance.id)
        .where(
            N8nInstance.id == instance_id,
            or_(N8nInstance.sync_claimed_until.is_(None), N8nInstance.sync_claimed_until < now),
        )
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    taken = await session.scalar(
        update(N8nInstance)
        .where(N8nInstance.id == free)
        .values(sync_claimed_until=now + timedelta(seconds=settings.n8n.sync_claim_s))
        .returning(N8nInstance.id)
    )
    return taken is not None


async def due(session: AsyncSession, settings: Settings, *, limit: int = 500) -> list[uuid.UUID]:
    """Enabled instances whose last sync is older than the interval and that nobody holds."""
    now = datetime.now(UTC)
    cutoff = now - timedelta(seconds=settings.n8n.sync_interval_s)
    rows = await session.scalars(
        select(N8nInstance.id)
        .where(
            N8nInstance.enabled.is_(True),
            or_(N8nInstance.last_synced_at.is_(None), N8nInstance.last_synced_at < cutoff),
            or_(N8nInstance.sync_claimed_until.is_(None), N8nInstance.sync_claimed_until < now),
        )
        .order_by(N8nInstance.last_synced_at.asc().nulls_first())
        .limit(limit)
    )
    return list(rows.all())


async def sync_instance(
    session: AsyncSession, settings: Settings, instance: N8nInstance
) -> Outcome:
    """Claim, read and apply in the caller's transaction (the on-demand refresh, due or
    not: the claim's row lock is held while n8n is read, which beat's SKIP LOCKED steps
    around)."""
    if not await claim(session, settings, instance.id):
        return Outcome(
            ok=False, status=instance.status, reason="a sync of this instance is running",
            busy=True,
        )  # fmt: skip
    await session.refresh(instance)
    snap = await snapshot(session, settings, instance)
    fetched = await fetch(settings, snap)
    return await apply(session, instance, snap, fetched)
