"""What the snapshot routes and beat do with snapshots: list a workflow's, restore one
(the current definition snapshotted first; published again if it was), take nightly ones
where the definition changed, and export an environment as one zip archive."""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.activity.service import record
from backend.auth.dependencies import WorkspaceAccess
from backend.config import Settings
from backend.kit.db import UnitOfWork
from backend.kit.errors import NotFound
from backend.kit.logging import get_logger
from backend.models import N8nEnvironment, N8nInstance, N8nSnapshot
from backend.n8n import client as n8n
from backend.n8n import environments, snapshots
from backend.n8n.api_types import Workflow

log = get_logger(__name__)


def list_query(instance_id: uuid.UUID, n8n_workflow_id: str) -> Select[N8nSnapshot]:
    return (
        select(N8nSnapshot)
        .where(N8nSnapshot.instance_id == instance_id,
               N8nSnapshot.n8n_workflow_id == n8n_workflow_id)
        .order_by(N8nSnapshot.created_at.desc(), N8nSnapshot.id.desc())
    )  # fmt: skip


async def take_manual(
    uow: UnitOfWork, settings: Settings, access: WorkspaceAccess, n8n_workflow_id: str,
    note: str | None,
) -> N8nSnapshot:  # fmt: skip
    instance: N8nInstance = access.resource
    snap = await snapshots.take(
        uow.session, workspace_id=instance.workspace_id, instance_id=instance.id,
        n8n_workflow_id=n8n_workflow_id, reason="manual", by_user_id=access.user.id, note=note,
        settings=settings,
    )  # fmt: skip
    record(uow.session, access.principal, workspace_id=instance.workspace_id,
           action="n8n.snapshot.create", resource_type="n8n_snapshot", resource_id=snap.id,
           details={"instance_id": str(instance.id), "n8n_workflow_id": n8n_workflow_id,
                    "digest": snap.digest})  # fmt: skip
    return snap


@dataclass
class Restored:
    before: N8nSnapshot | None
    after: N8nSnapshot
    n8n_workflow_id: str
    active: bool


async def restore(
    uow: UnitOfWork, settings: Settings, access: WorkspaceAccess, note: str | None
) -> Restored:
    """Write the snapshot back to its workflow: snapshot what is there now
    (pre-restore), PUT the snapshot's definition (a deleted workflow is created again),
    publish it if the workflow was published, read it back. In an environment the
    result becomes the workflow's baseline (a restore through us is not drift)."""
    session = uow.session
    snap: N8nSnapshot = access.resource
    instance = await session.get(N8nInstance, snap.instance_id)
    if instance is None:
        raise NotFound("the snapshot's instance is gone")
    env = await environments.environment_of_instance(session, instance.id)
    environments.require_admin_for_protected(env, access.role, "a restore")
    if env is not None:
        environments.check_hours(env)
    try:
        live: dict[str, Any] | None = dict(
            await snapshots.fetch(settings, instance, snap.n8n_workflow_id)
        )
    except NotFound:
        live = None
    before = None
    if live is not None:
        before = await snapshots.take(
            session, workspace_id=instance.workspace_id, instance_id=instance.id,
            n8n_workflow_id=snap.n8n_workflow_id, reason="pre-restore",
            by_user_id=access.user.id, definition=live, note=note,
        )  # fmt: skip
    publish = bool(live.get("active")) if live is not None else snap.active
    written = await snapshots.write_back(
        settings, instance, snap,
        n8n_workflow_id=snap.n8n_workflow_id if live is not None else None,
        current=live, publish=publish,
    )  # fmt: skip
    new_id = str(written.get("id") or snap.n8n_workflow_id)
    after = await snapshots.take(
        session, workspace_id=instance.workspace_id, instance_id=instance.id,
        n8n_workflow_id=new_id, reason="restore", by_user_id=access.user.id,
        definition=dict(written), note=note,
    )  # fmt: skip
    if env is not None:
        if new_id != snap.n8n_workflow_id:
            await snapshots.clear_baseline(
                session, instance_id=instance.id, n8n_workflow_id=snap.n8n_workflow_id
            )
        await snapshots.set_baseline(
            session, instance_id=instance.id, n8n_workflow_id=new_id, snapshot_id=after.id
        )
    record(session, access.principal, workspace_id=instance.workspace_id,
           action="n8n.snapshot.restore", resource_type="n8n_snapshot", resource_id=snap.id,
           details={"instance_id": str(instance.id), "n8n_workflow_id": new_id,
                    "before": str(before.id) if before else None, "after": str(after.id),
                    "published": bool(written.get("active"))})  # fmt: skip
    return Restored(before=before, after=after, n8n_workflow_id=new_id,
                    active=bool(written.get("active")))  # fmt: skip


# Nightly ----------------------------------------------------------------------------------


async def nightly_instance(session: AsyncSession, settings: Settings, instance: N8nInstance) -> int:
    """A nightly snapshot of each workflow whose digest differs from its latest
    snapshot's (or that has none). How many were taken."""
    from backend.n8n.drift import live_workflows

    live = await live_workflows(settings, instance)
    taken = 0
    for wid, workflow in live.items():
        latest = await snapshots.latest(session, instance.id, wid)
        if latest is not None and latest.digest == snapshots.digest(
            snapshots.normalise(dict(workflow))
        ):
            continue
        await snapshots.take(
            session, workspace_id=instance.workspace_id, instance_id=instance.id,
            n8n_workflow_id=wid, reason="nightly", by_user_id=None, definition=dict(workflow),
        )  # fmt: skip
        taken += 1
    return taken


# Export -----------------------------------------------------------------------------------


class _Sink(io.RawIOBase):
    """A write-only stream zipfile writes into; the route takes what accumulated after
    each file, so the archive goes out file by file, never whole in memory."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.chunks.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self.chunks)
        self.chunks.clear()
        return out


def _entry(workflow: Workflow) -> dict[str, Any]:
    definition = dict(workflow)
    normal = snapshots.normalise(definition)
    refs = snapshots.references(definition)
    return {
        "id": str(workflow.get("id")),
        "name": normal["name"],
        "active": bool(workflow.get("active")),
        "digest": snapshots.digest(normal),
        "normalised": normal,
        # Importable as is (`n8n import:workflow`, or POST /workflows).
        "n8n": snapshots.to_n8n(normal, refs),
    }


async def export_workflows(settings: Settings, instance: N8nInstance) -> list[Workflow]:
    from backend.n8n.drift import live_workflows
    from backend.n8n.service import upstream

    try:
        return list((await live_workflows(settings, instance)).values())
    except n8n.N8nFailure as exc:
        raise upstream(exc) from exc


def archive(
    env: N8nEnvironment, instance: N8nInstance, workflows: list[Workflow]
) -> Iterator[bytes]:
    """The zip: manifest.json, then workflows/<id>.json per workflow."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        entries = []
        for workflow in sorted(workflows, key=lambda w: str(w.get("id"))):
            entry = _entry(workflow)
            path = f"workflows/{entry['id']}.json"
            zf.writestr(path, json.dumps(entry, indent=2, sort_keys=True, ensure_ascii=False))
            entries.append(
                {k: entry[k] for k in ("id", "name", "active", "digest")} | {"file": path}
            )
            yield sink.take()
        manifest = {
            "format": "orchestration-studio/n8n-environment-export@1",
            "exported_at": datetime.now(UTC).isoformat(),
            "environment": {"id": str(env.id), "stage": env.stage},
            "instance": {"id": str(instance.id), "name": instance.name,
                         "base_url": instance.base_url},
            "workflows": entries,
        }  # fmt: skip
        zf.writestr("manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False))
    yield sink.take()


async def stream(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        if chunk:
            yield chunk
