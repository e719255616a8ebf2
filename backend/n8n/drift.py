"""Drift: an environment's workflows compared with their baselines (the last snapshot
promoted, accepted or restored there).

A check reads every workflow from the instance. The first check of an environment adopts
what is there as the baselines (nothing can have drifted from a baseline that did not
exist). After that, a workflow whose digest differs from its baseline is `changed`, one
without a baseline is `added`, a baseline whose workflow is gone (or archived) is
`deleted`. Each gets one unresolved incident (open or acknowledged); a further drift
updates it and tells people again, a workflow back at its baseline resolves it. The
environment's policy decides what happens next: `notify` (an incident, people told),
`accept` (the drifted definition becomes the baseline; the incident is recorded as
accepted), `restore` (the baseline is written back; recorded as reverted; an added
workflow is only reported, never deleted by a policy)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.permissions import Role
from backend.config import Settings
from backend.kit.db import UnitOfWork
from backend.kit.errors import Conflict, NotFound, UpstreamError
from backend.kit.logging import get_logger
from backend.models import (
    N8nBaseline,
    N8nDriftIncident,
    N8nEnvironment,
    N8nInstance,
    N8nSnapshot,
    N8nWatch,
    User,
    WorkspaceMember,
)
from backend.n8n import client as n8n
from backend.n8n import snapshots
from backend.n8n.api_types import Workflow

log = get_logger(__name__)
KIND = "n8n_drift"
UNRESOLVED = ("open", "acknowledged")
MAX_PEOPLE = 200


@dataclass
class Outcome:
    ok: bool = True
    reason: str | None = None
    adopted: int = 0
    in_sync: int = 0
    opened: int = 0
    updated: int = 0
    accepted: int = 0
    reverted: int = 0
    resolved: int = 0


async def live_workflows(settings: Settings, instance: N8nInstance) -> dict[str, Workflow]:
    """Every workflow on the instance that is not archived, by id."""
    from backend.n8n.service import client_of

    async with client_of(settings, instance) as api:
        listed = await api.workflows()
    return {str(w["id"]): w for w in listed if w.get("id") and not w.get("isArchived")}


async def unresolved(
    session: AsyncSession, instance_id: uuid.UUID, n8n_workflow_id: str
) -> N8nDriftIncident | None:
    row: N8nDriftIncident | None = await session.scalar(
        select(N8nDriftIncident).where(
            N8nDriftIncident.instance_id == instance_id,
            N8nDriftIncident.n8n_workflow_id == n8n_workflow_id,
            N8nDriftIncident.status.in_(UNRESOLVED),
        )
    )
    return row


async def recipients(session: AsyncSession, instance: N8nInstance) -> list[uuid.UUID]:
    """Who hears of drift: the instance's watchers and the workspace's administrators
    and owners (active members)."""
    rows = await session.scalars(
        select(WorkspaceMember.user_id)
        .join(User, (User.id == WorkspaceMember.user_id) & User.is_active.is_(True))
        .outerjoin(
            N8nWatch,
            (N8nWatch.user_id == WorkspaceMember.user_id) & (N8nWatch.instance_id == instance.id),
        )
        .where(
            WorkspaceMember.workspace_id == instance.workspace_id,
            or_(
                N8nWatch.id.is_not(None),
                WorkspaceMember.role.in_([Role.ADMINISTRATOR.value, Role.OWNER.value]),
            ),
        )
        .distinct()
        .limit(MAX_PEOPLE)
    )
    return list(rows.all())


def summary(changes: list[dict[str, Any]]) -> str:
    lines = []
    for c in changes[:10]:
        kind = c.get("kind")
        if kind == "node_changed":
            paths = ", ".join(str(p["path"]) for p in c.get("changes", [])[:5])
            lines.append(f"node {c['node']!r} changed: {paths}")
        elif kind in ("node_added", "node_removed"):
            lines.append(f"{kind.replace('_', ' ')}: {c['node']!r} ({c.get('type')})")
        elif kind == "settings_changed":
            lines.append(f"setting {c.get('path')} {c.get('change')}")
        elif kind == "connections_changed":
            lines.append(f"connections from {c['node']!r} changed")
        else:
            lines.append(str(kind).replace("_", " "))
    if len(changes) > 10:
        lines.append(f"... and {len(changes) - 10} more")
    return "\n".join(lines)


async def tell(
    uow: UnitOfWork, settings: Settings, instance: N8nInstance, env: N8nEnvironment,
    incident: N8nDriftIncident,
) -> None:  # fmt: skip
    from backend.push.service import notify

    people = await recipients(uow.session, instance)
    verb = {"changed": "was changed", "added": "was added", "deleted": "was deleted"}[incident.kind]
    after = {"accepted": " (accepted by policy)", "reverted": " (reverted by policy)"}.get(
        incident.status, ""
    )
    title = (
        f"n8n drift: {incident.name or incident.n8n_workflow_id} {verb} on {instance.name}{after}"
    )
    body = (
        f"Environment: {env.stage} ({instance.name}, {instance.base_url})\n"
        f"Workflow: {incident.name} (id {incident.n8n_workflow_id})\n"
        f"Outside a promotion; policy: {env.drift_policy}\n" + summary(incident.diff)
    )
    await notify(
        uow, settings, people, kind=KIND, title=title[:200], body=body,
        workspace_id=instance.workspace_id,
        data={"incident_id": str(incident.id), "environment_id": str(env.id),
              "instance_id": str(instance.id), "n8n_workflow_id": incident.n8n_workflow_id,
              "kind": incident.kind, "status": incident.status},
    )  # fmt: skip


async def adopt(
    session: AsyncSession, env: N8nEnvironment, instance: N8nInstance, live: dict[str, Workflow]
) -> int:
    """Take what is on the instance as the baselines (first check of an environment)."""
    have = set(
        (
            await session.scalars(
                select(N8nBaseline.n8n_workflow_id).where(N8nBaseline.instance_id == instance.id)
            )
        ).all()
    )
    count = 0
    for wid, workflow in live.items():
        if wid in have:
            continue
        snap = await snapshots.take(
            session, workspace_id=instance.workspace_id, instance_id=instance.id,
            n8n_workflow_id=wid, reason="baseline", by_user_id=None, definition=dict(workflow),
        )  # fmt: skip
        await snapshots.set_baseline(
            session, instance_id=instance.id, n8n_workflow_id=wid, snapshot_id=snap.id
        )
        count += 1
    env.baseline_adopted_at = datetime.now(UTC)
    return count


async def check_environment(uow: UnitOfWork, settings: Settings, env: N8nEnvironment) -> Outcome:
    """One drift pass over the environment; failures to reach n8n are the outcome's
    reason (nothing stored changes)."""
    session = uow.session
    out = Outcome()
    # One check of an environment at a time (beat and a person's check-now): the
    # second waits here and then sees the first one's incidents, never a duplicate.
    locked = await session.get(N8nEnvironment, env.id, with_for_update=True, populate_existing=True)
    if locked is None:
        return Outcome(ok=False, reason="environment gone")
    env = locked
    instance = await session.get(N8nInstance, env.instance_id)
    if instance is None:
        return Outcome(ok=False, reason="instance gone")
    try:
        live = await live_workflows(settings, instance)
    except n8n.N8nFailure as exc:
        return Outcome(ok=False, reason=exc.message)
    if env.baseline_adopted_at is None:
        out.adopted = await adopt(session, env, instance, live)
        env.drift_checked_at = datetime.now(UTC)
        await session.flush()
        return out
    baselines = {
        b.n8n_workflow_id: b
        for b in (
            await session.scalars(select(N8nBaseline).where(N8nBaseline.instance_id == instance.id))
        ).all()
    }
    for wid, workflow in live.items():
        base = baselines.get(wid)
        base_snap = await session.get(N8nSnapshot, base.snapshot_id) if base else None
        normal = snapshots.normalise(dict(workflow))
        now_digest = snapshots.digest(normal)
        active = bool(workflow.get("active"))
        if base_snap is not None and base_snap.digest == now_digest and base_snap.active == active:
            out.in_sync += 1
            open_one = await unresolved(session, instance.id, wid)
            if open_one is not None:
                _close(open_one, "resolved", None, "back at its baseline")
                out.resolved += 1
            continue
        kind = "added" if base_snap is None else "changed"
        changes = (
            snapshots.diff(snapshots.normalised_of(base_snap), normal)
            if base_snap is not None
            else snapshots.diff({"name": normal["name"], "nodes": {}, "connections": {},
                                 "settings": {}}, normal)
        )  # fmt: skip
        if base_snap is not None and base_snap.active != active:
            # Switched on or off by hand: a change too (the definition may be the same).
            changes.append({"kind": "active_changed", "before": base_snap.active, "after": active})
        await _drifted(uow, settings, env, instance, out, wid, kind, base_snap, workflow, changes,
                       now_digest)  # fmt: skip
    for wid, base in baselines.items():
        if wid in live:
            continue
        base_snap = await session.get(N8nSnapshot, base.snapshot_id)
        changes = [{"kind": "workflow_deleted", "name": base_snap.name if base_snap else None}]
        await _drifted(uow, settings, env, instance, out, wid, "deleted", base_snap, None, changes,
                       None)  # fmt: skip
    env.drift_checked_at = datetime.now(UTC)
    await session.flush()
    return out


def _close(incident: N8nDriftIncident, status: str, by: uuid.UUID | None, resolution: str) -> None:
    incident.status = status
    incident.resolved_at = datetime.now(UTC)
    incident.resolved_by = by
    incident.resolution = resolution[:50]


async def _drifted(
    uow: UnitOfWork,
    settings: Settings,
    env: N8nEnvironment,
    instance: N8nInstance,
    out: Outcome,
    wid: str,
    kind: str,
    base_snap: N8nSnapshot | None,
    workflow: Workflow | None,
    changes: list[dict[str, Any]],
    now_digest: str | None,
) -> None:
    session = uow.session
    now = datetime.now(UTC)
    incident = await unresolved(session, instance.id, wid)
    seen = (
        await session.get(N8nSnapshot, incident.current_snapshot_id)
        if incident is not None and incident.current_snapshot_id
        else None
    )
    same_state = seen is None or workflow is None or seen.active == bool(workflow.get("active"))
    if (
        incident is not None
        and incident.current_digest == now_digest
        and incident.kind == kind
        and same_state
    ):
        # Seen before, not drifted further: no new snapshot, nobody told again.
        incident.last_seen_at = now
        return
    current: N8nSnapshot | None = None
    if workflow is not None:
        current = await snapshots.take(
            session, workspace_id=instance.workspace_id, instance_id=instance.id,
            n8n_workflow_id=wid, reason="drift", by_user_id=None, definition=dict(workflow),
        )  # fmt: skip
    name = (current.name if current else base_snap.name if base_snap else wid)[:500]
    if incident is None:
        incident = N8nDriftIncident(
            id=uuid.uuid4(), workspace_id=instance.workspace_id, environment_id=env.id,
            instance_id=instance.id, n8n_workflow_id=wid, status="open", detections=1,
        )  # fmt: skip
        session.add(incident)
        out.opened += 1
    else:
        incident.detections += 1
        incident.status = "open"
        out.updated += 1
    incident.name = name
    incident.kind = kind
    incident.baseline_snapshot_id = base_snap.id if base_snap else None
    incident.current_snapshot_id = current.id if current else None
    incident.current_digest = now_digest
    incident.diff = changes
    incident.last_seen_at = now
    await session.flush()
    if env.drift_policy == "accept":
        await accept(session, incident, current, None, "policy:accept")
        out.accepted += 1
    elif env.drift_policy == "restore" and kind != "added":
        try:
            await revert(session, settings, incident, None, "policy:restore")
        except (UpstreamError, Conflict) as exc:
            log.warning("n8n.drift_restore_failed", incident_id=str(incident.id),
                        reason=exc.detail)  # fmt: skip
        else:
            out.reverted += 1
    await session.flush()
    await tell(uow, settings, instance, env, incident)


async def accept(
    session: AsyncSession,
    incident: N8nDriftIncident,
    current: N8nSnapshot | None,
    by: uuid.UUID | None,
    resolution: str,
) -> None:
    """What is on the instance becomes the baseline (a deletion: no baseline)."""
    if incident.kind == "deleted":
        await snapshots.clear_baseline(
            session, instance_id=incident.instance_id, n8n_workflow_id=incident.n8n_workflow_id
        )
    else:
        if current is None:
            raise Conflict("the incident has no snapshot of the drifted workflow to accept")
        await snapshots.set_baseline(
            session, instance_id=incident.instance_id, n8n_workflow_id=incident.n8n_workflow_id,
            snapshot_id=current.id,
        )  # fmt: skip
    _close(incident, "accepted", by, resolution)


async def revert(
    session: AsyncSession,
    settings: Settings,
    incident: N8nDriftIncident,
    by: uuid.UUID | None,
    resolution: str,
) -> N8nSnapshot:
    """Write the baseline back (a deleted workflow is created again, under a new id n8n
    gives it); the definition n8n holds after becomes the baseline. An added workflow
    has no baseline to go back to: it is deleted on n8n, after a snapshot of it."""
    instance = await session.get(N8nInstance, incident.instance_id)
    assert instance is not None
    if incident.kind == "added":
        return await _remove_added(session, settings, instance, incident, by, resolution)
    base = (
        await session.get(N8nSnapshot, incident.baseline_snapshot_id)
        if incident.baseline_snapshot_id
        else None
    )
    if base is None:
        raise Conflict("the baseline snapshot of this incident is gone; accept it instead")
    live: dict[str, Any] | None = None
    if incident.kind == "changed":
        try:
            live = dict(await snapshots.fetch(settings, instance, incident.n8n_workflow_id))
        except NotFound:
            live = None  # deleted meanwhile: created again below
        if live is not None:
            await snapshots.take(
                session, workspace_id=instance.workspace_id, instance_id=instance.id,
                n8n_workflow_id=incident.n8n_workflow_id, reason="pre-restore", by_user_id=by,
                definition=live,
            )  # fmt: skip
    # Back to the baseline's state too: published if it was, off if it was off.
    written = await snapshots.write_back(
        settings, instance, base,
        n8n_workflow_id=incident.n8n_workflow_id if live is not None else None,
        current=live, publish=base.active, unpublish=not base.active,
    )  # fmt: skip
    new_id = str(written.get("id") or incident.n8n_workflow_id)
    after = await snapshots.take(
        session, workspace_id=instance.workspace_id, instance_id=instance.id,
        n8n_workflow_id=new_id, reason="restore", by_user_id=by, definition=dict(written),
    )  # fmt: skip
    if new_id != incident.n8n_workflow_id:
        await snapshots.clear_baseline(
            session, instance_id=instance.id, n8n_workflow_id=incident.n8n_workflow_id
        )
        resolution = f"{resolution} as {new_id}"
    await snapshots.set_baseline(
        session, instance_id=instance.id, n8n_workflow_id=new_id, snapshot_id=after.id
    )
    _close(incident, "reverted", by, resolution)
    return after


async def _remove_added(
    session: AsyncSession, settings: Settings, instance: N8nInstance,
    incident: N8nDriftIncident, by: uuid.UUID | None, resolution: str,
) -> N8nSnapshot:  # fmt: skip
    from backend.n8n.service import client_of, upstream

    live = dict(await snapshots.fetch(settings, instance, incident.n8n_workflow_id))
    before = await snapshots.take(
        session, workspace_id=instance.workspace_id, instance_id=instance.id,
        n8n_workflow_id=incident.n8n_workflow_id, reason="pre-restore", by_user_id=by,
        definition=live,
    )  # fmt: skip
    try:
        async with client_of(settings, instance) as api:
            wid = incident.n8n_workflow_id
            if live.get("active"):
                await api.unpublish(wid)
            try:
                await api.delete_workflow(wid)
            except (n8n.Rejected, n8n.Forbidden):
                # n8n 2.x may keep deletion to archived workflows: archiving takes it off
                # the instance's workflows (and out of drift) all the same.
                await api.request("POST", f"/workflows/{wid}/archive")
    except n8n.N8nFailure as exc:
        raise upstream(exc) from exc
    _close(incident, "reverted", by, f"{resolution} (deleted)")
    return before


# Reading ----------------------------------------------------------------------------------


async def report(session: AsyncSession, env: N8nEnvironment) -> dict[str, Any]:
    """Per workflow we know of on the instance: in sync, drifted (an unresolved
    incident) or untracked (no baseline yet)."""
    from backend.models import N8nWorkflow

    baselines = {
        b.n8n_workflow_id: b
        for b in (
            await session.scalars(
                select(N8nBaseline).where(N8nBaseline.instance_id == env.instance_id)
            )
        ).all()
    }
    incidents = {
        i.n8n_workflow_id: i
        for i in (
            await session.scalars(
                select(N8nDriftIncident).where(
                    N8nDriftIncident.instance_id == env.instance_id,
                    N8nDriftIncident.status.in_(UNRESOLVED),
                )
            )
        ).all()
    }
    synced = {
        w.n8n_id: w.name
        for w in (
            await session.scalars(
                select(N8nWorkflow).where(N8nWorkflow.instance_id == env.instance_id)
            )
        ).all()
    }
    rows = []
    for wid in sorted(set(baselines) | set(incidents) | set(synced)):
        base = baselines.get(wid)
        snap = await session.get(N8nSnapshot, base.snapshot_id) if base else None
        incident = incidents.get(wid)
        state = "drifted" if incident else "in_sync" if base else "untracked"
        name = incident.name if incident else snap.name if snap else synced.get(wid, wid)
        rows.append({
            "n8n_workflow_id": wid, "name": name, "state": state,
            "baseline_snapshot_id": snap.id if snap else None,
            "baseline_digest": snap.digest if snap else None,
            "incident_id": incident.id if incident else None,
            "incident_kind": incident.kind if incident else None,
        })  # fmt: skip
    by_kind: dict[str, int] = {}
    for incident in incidents.values():
        by_kind[incident.kind] = by_kind.get(incident.kind, 0) + 1
    since = datetime.now(UTC) - timedelta(days=30)
    closed = await session.execute(
        select(N8nDriftIncident.status, func.count())
        .where(
            N8nDriftIncident.environment_id == env.id,
            N8nDriftIncident.status.not_in(UNRESOLVED),
            N8nDriftIncident.resolved_at >= since,
        )
        .group_by(N8nDriftIncident.status)
    )
    return {
        "checked_at": env.drift_checked_at,
        "workflows": rows,
        "open_incidents": len(incidents),
        "by_kind": by_kind,
        "resolved_last_30_days": {status: int(n) for status, n in closed.all()},
    }


async def after_toggle(session: AsyncSession, instance_id: uuid.UUID, n8n_workflow_id: str,
                       active: bool) -> None:  # fmt: skip
    """A toggle through us (an unprotected environment) is not drift: the baseline moves
    to the same definition in the new state (a copy of the baseline snapshot)."""
    base = await snapshots.baseline_of(session, instance_id, n8n_workflow_id)
    if base is None or base.active == active:
        return
    copy = N8nSnapshot(
        id=uuid.uuid4(), workspace_id=base.workspace_id, instance_id=instance_id,
        n8n_workflow_id=n8n_workflow_id, name=base.name, active=active,
        definition=base.definition, digest=base.digest, reason="baseline",
        note="switched " + ("on" if active else "off") + " through Orchestration Studio",
        by_user_id=None, n8n_version_id=base.n8n_version_id, node_count=base.node_count,
        created_at=datetime.now(UTC),
    )  # fmt: skip
    session.add(copy)
    await session.flush()
    await snapshots.set_baseline(
        session, instance_id=instance_id, n8n_workflow_id=n8n_workflow_id, snapshot_id=copy.id
    )
