"""/api/v1/n8n environments, pipelines, snapshots and drift incidents (issue 18 part A).

Environments and pipelines are policy: creating or changing them takes an administrator
(workspace.settings). Snapshots and incidents are work: editors take, restore, accept and
revert them, except on a protected environment, where restores and reverts take an
administrator and direct toggles are refused."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, status
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from backend.auth.dependencies import SettingsDep, WorkspaceAccess, require
from backend.auth.permissions import Permission as P  # noqa: N817 - reads as a table
from backend.kit.db import UnitOfWorkDep
from backend.kit.errors import InvalidTransition, NotFound
from backend.kit.pagination import Page, PageParamsDep
from backend.models import (
    N8nDriftIncident,
    N8nEnvironment,
    N8nInstance,
    N8nPipeline,
    N8nSnapshot,
)
from backend.n8n import drift, environments, snapshot_ops, snapshots
from backend.n8n.env_schemas import (
    DriftCheckResult,
    DriftReport,
    EnvironmentCreate,
    EnvironmentPatch,
    EnvironmentRead,
    IncidentAction,
    IncidentRead,
    IncidentStatus,
    PipelineCreate,
    PipelinePatch,
    PipelineRead,
    RestoreRequest,
    RestoreResult,
    SnapshotCreate,
    SnapshotDetail,
    SnapshotDiff,
    SnapshotRead,
    Stage,
)
from backend.n8n.repository import paginate

# Included by backend/n8n/router.py under its /n8n prefix.
router = APIRouter(tags=["n8n environments"])
N8nIdPath = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


def _on(permission: P, model: type[object], param: str) -> WorkspaceAccess:
    result: WorkspaceAccess = require(permission, resource=model, param=param)
    return result


# Environments -----------------------------------------------------------------------------


@router.get("/environments")
async def list_environments(
    uow: UnitOfWorkDep,
    stage: Annotated[Stage | None, Query()] = None,
    access: WorkspaceAccess = require(P.WORKFLOWS_READ, scope="header"),
) -> list[EnvironmentRead]:
    rows = await environments.list_environments(uow.session, access.workspace.id, stage=stage)
    return [await environments.read(uow.session, e) for e in rows]


@router.post("/environments", status_code=status.HTTP_201_CREATED)
async def create_environment(
    body: EnvironmentCreate,
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = require(P.WORKSPACE_SETTINGS, scope="header"),
) -> EnvironmentRead:
    """Make an instance an environment: its stage and policies. The first drift check
    (beat, or `POST .../drift-check`) takes what is on it as the baselines."""
    env = await environments.create(uow, access, body)
    return await environments.read(uow.session, env)


@router.get("/environments/{environment_id}")
async def get_environment(
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = _on(P.WORKFLOWS_READ, N8nEnvironment, "environment_id"),
) -> EnvironmentRead:
    return await environments.read(uow.session, access.resource)


@router.patch("/environments/{environment_id}")
async def update_environment(
    body: EnvironmentPatch,
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = _on(P.WORKSPACE_SETTINGS, N8nEnvironment, "environment_id"),
) -> EnvironmentRead:
    """Change stage or policies; `allowed_hours: null` lifts the window."""
    env = await environments.update(uow, access, body)
    return await environments.read(uow.session, env)


@router.delete("/environments/{environment_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_environment(
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = _on(P.WORKSPACE_SETTINGS, N8nEnvironment, "environment_id"),
) -> None:
    await environments.delete(uow, access)


@router.post("/environments/{environment_id}/drift-check")
async def check_drift(
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    access: WorkspaceAccess = _on(P.WORKFLOWS_EXECUTE, N8nEnvironment, "environment_id"),
) -> DriftCheckResult:
    """Compare the environment's workflows with their baselines now (beat does it every
    N8N__DRIFT_INTERVAL_S). An instance that cannot be reached answers `ok: false`."""
    outcome = await drift.check_environment(uow, settings, access.resource)
    return DriftCheckResult(**outcome.__dict__)


@router.get("/environments/{environment_id}/drift-report")
async def drift_report(
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = _on(P.WORKFLOWS_READ, N8nEnvironment, "environment_id"),
) -> DriftReport:
    """Each workflow's state against its baseline, open incidents by kind, and how the
    last 30 days' incidents ended."""
    env: N8nEnvironment = access.resource
    body = await drift.report(uow.session, env)
    return DriftReport(environment=await environments.read(uow.session, env), **body)


@router.get(
    "/environments/{environment_id}/export",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/zip": {}}, "description": "a zip archive"}},
)
async def export_environment(
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    access: WorkspaceAccess = _on(P.WORKFLOWS_READ, N8nEnvironment, "environment_id"),
) -> StreamingResponse:
    """Every (non-archived) workflow of the environment as it is on n8n now, one zip:
    `manifest.json` and `workflows/<id>.json` (normalised definition, digest, and an
    importable n8n body)."""
    env: N8nEnvironment = access.resource
    instance = await uow.session.get(N8nInstance, env.instance_id)
    if instance is None:
        raise NotFound("n8n environment not found")
    workflows = await snapshot_ops.export_workflows(settings, instance)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    filename = f"n8n-{env.stage}-{stamp}.zip"
    return StreamingResponse(
        snapshot_ops.stream(snapshot_ops.archive(env, instance, workflows)),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


# Pipelines --------------------------------------------------------------------------------


@router.get("/pipelines")
async def list_pipelines(
    uow: UnitOfWorkDep,
    page: PageParamsDep,
    access: WorkspaceAccess = require(P.WORKFLOWS_READ, scope="header"),
) -> Page[PipelineRead]:
    stmt = (
        select(N8nPipeline)
        .where(N8nPipeline.workspace_id == access.workspace.id)
        .order_by(N8nPipeline.name, N8nPipeline.id)
    )
    items, total = await paginate(uow.session, stmt, limit=page.limit, offset=page.offset)
    return Page(
        items=[await environments.pipeline_read(uow.session, p) for p in items],
        total=total,
        limit=page.limit,
        offset=page.offset,
    )


@router.post("/pipelines", status_code=status.HTTP_201_CREATED)
async def create_pipeline(
    body: PipelineCreate,
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = require(P.WORKSPACE_SETTINGS, scope="header"),
) -> PipelineRead:
    """Environments in promotion order, e.g. dev -> staging -> production."""
    pipeline = await environments.create_pipeline(uow, access, body)
    return await environments.pipeline_read(uow.session, pipeline)


@router.get("/pipelines/{pipeline_id}")
async def get_pipeline(
    uow: UnitOfWorkDep, access: WorkspaceAccess = _on(P.WORKFLOWS_READ, N8nPipeline, "pipeline_id")
) -> PipelineRead:
    return await environments.pipeline_read(uow.session, access.resource)


@router.patch("/pipelines/{pipeline_id}")
async def update_pipeline(
    body: PipelinePatch,
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = _on(P.WORKSPACE_SETTINGS, N8nPipeline, "pipeline_id"),
) -> PipelineRead:
    pipeline = await environments.update_pipeline(uow, access, body)
    return await environments.pipeline_read(uow.session, pipeline)


@router.delete("/pipelines/{pipeline_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_pipeline(
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = _on(P.WORKSPACE_SETTINGS, N8nPipeline, "pipeline_id"),
) -> None:
    await environments.delete_pipeline(uow, access)


# Snapshots --------------------------------------------------------------------------------


@router.post(
    "/instances/{instance_id}/workflows/{workflow_n8n_id}/snapshots",
    status_code=status.HTTP_201_CREATED,
)
async def take_snapshot(
    workflow_n8n_id: N8nIdPath,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    body: SnapshotCreate | None = None,
    access: WorkspaceAccess = _on(P.WORKFLOWS_WRITE, N8nInstance, "instance_id"),
) -> SnapshotDetail:
    """Snapshot the workflow as n8n has it now (reason `manual`)."""
    note = body.note if body is not None else None
    snap = await snapshot_ops.take_manual(uow, settings, access, workflow_n8n_id, note)
    return SnapshotDetail.model_validate(_detail(snap))


@router.get("/instances/{instance_id}/workflows/{workflow_n8n_id}/snapshots")
async def list_snapshots(
    workflow_n8n_id: N8nIdPath,
    uow: UnitOfWorkDep,
    page: PageParamsDep,
    access: WorkspaceAccess = _on(P.WORKFLOWS_READ, N8nInstance, "instance_id"),
) -> Page[SnapshotRead]:
    """The workflow's snapshots, newest first."""
    stmt = snapshot_ops.list_query(access.resource.id, workflow_n8n_id)
    items, total = await paginate(uow.session, stmt, limit=page.limit, offset=page.offset)
    return Page(
        items=[SnapshotRead.model_validate(s) for s in items],
        total=total,
        limit=page.limit,
        offset=page.offset,
    )


def _detail(snap: N8nSnapshot) -> dict[str, object]:
    out = {k: getattr(snap, k) for k in SnapshotRead.model_fields}
    out["definition"] = snapshots.normalised_of(snap)
    return out


@router.get("/snapshots/{snapshot_id}")
async def get_snapshot(
    access: WorkspaceAccess = _on(P.WORKFLOWS_READ, N8nSnapshot, "snapshot_id"),
) -> SnapshotDetail:
    return SnapshotDetail.model_validate(_detail(access.resource))


@router.get("/snapshots/{snapshot_id}/diff/{other_id}")
async def diff_snapshots(
    other_id: uuid.UUID,
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = _on(P.WORKFLOWS_READ, N8nSnapshot, "snapshot_id"),
) -> SnapshotDiff:
    """What changed from this snapshot to the other (any two of the workspace, also
    across instances): node added/removed/changed with parameter paths, connections,
    settings, name."""
    mine: N8nSnapshot = access.resource
    other = await uow.session.get(N8nSnapshot, other_id)
    if other is None or other.workspace_id != mine.workspace_id:
        raise NotFound("n8n snapshot not found", field="other_id")
    changes = snapshots.diff(snapshots.normalised_of(mine), snapshots.normalised_of(other))
    return SnapshotDiff(from_id=mine.id, to_id=other.id, same=not changes, changes=changes)


@router.post("/snapshots/{snapshot_id}/restore")
async def restore_snapshot(
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    body: RestoreRequest | None = None,
    access: WorkspaceAccess = _on(P.WORKFLOWS_WRITE, N8nSnapshot, "snapshot_id"),
) -> RestoreResult:
    """Write the snapshot back to its workflow on n8n: the current definition is
    snapshotted first (`pre-restore`), the workflow stays published if it was, and what
    n8n holds after is snapshotted (`restore`) and, in an environment, becomes the
    baseline. On a protected environment: administrators only, within its hours."""
    done = await snapshot_ops.restore(uow, settings, access, body.note if body else None)
    return RestoreResult(
        restored=SnapshotRead.model_validate(access.resource),
        before=SnapshotRead.model_validate(done.before) if done.before else None,
        after=SnapshotRead.model_validate(done.after),
        n8n_workflow_id=done.n8n_workflow_id,
        active=done.active,
    )


# Drift incidents --------------------------------------------------------------------------


@router.get("/drift/incidents")
async def list_incidents(
    uow: UnitOfWorkDep,
    page: PageParamsDep,
    environment_id: uuid.UUID | None = None,
    status_: Annotated[IncidentStatus | None, Query(alias="status")] = None,
    unresolved: bool | None = None,
    access: WorkspaceAccess = require(P.WORKFLOWS_READ, scope="header"),
) -> Page[IncidentRead]:
    """The workspace's drift incidents, newest first; filter by environment, status,
    or `unresolved=true` (open and acknowledged)."""
    stmt = select(N8nDriftIncident).where(N8nDriftIncident.workspace_id == access.workspace.id)
    if environment_id is not None:
        stmt = stmt.where(N8nDriftIncident.environment_id == environment_id)
    if status_ is not None:
        stmt = stmt.where(N8nDriftIncident.status == status_)
    if unresolved is not None:
        cond = N8nDriftIncident.status.in_(drift.UNRESOLVED)
        stmt = stmt.where(cond if unresolved else ~cond)
    stmt = stmt.order_by(N8nDriftIncident.created_at.desc(), N8nDriftIncident.id.desc())
    items, total = await paginate(uow.session, stmt, limit=page.limit, offset=page.offset)
    return Page(
        items=[IncidentRead.model_validate(i) for i in items],
        total=total,
        limit=page.limit,
        offset=page.offset,
    )


IncidentWrite = _on(P.WORKFLOWS_WRITE, N8nDriftIncident, "incident_id")


@router.get("/drift/incidents/{incident_id}")
async def get_incident(
    access: WorkspaceAccess = _on(P.WORKFLOWS_READ, N8nDriftIncident, "incident_id"),
) -> IncidentRead:
    return IncidentRead.model_validate(access.resource)


def _unresolved(incident: N8nDriftIncident, action: str) -> None:
    if incident.status not in drift.UNRESOLVED:
        raise InvalidTransition(
            f"the incident is {incident.status}; only open or acknowledged ones can be {action}",
            status=incident.status,
        )


@router.post("/drift/incidents/{incident_id}/acknowledge")
async def acknowledge_incident(
    uow: UnitOfWorkDep, body: IncidentAction | None = None, access: WorkspaceAccess = IncidentWrite
) -> IncidentRead:
    """Someone is on it: the incident stays unresolved (a further drift reopens it)."""
    incident: N8nDriftIncident = access.resource
    if incident.status != "open":
        raise InvalidTransition(
            f"the incident is {incident.status}; only open ones can be acknowledged",
            status=incident.status,
        )
    incident.status = "acknowledged"
    incident.acknowledged_by = access.user.id
    incident.acknowledged_at = datetime.now(UTC)
    await uow.session.flush()
    _log(uow, access, incident, "acknowledge", body)
    return IncidentRead.model_validate(incident)


@router.post("/drift/incidents/{incident_id}/accept")
async def accept_incident(
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    body: IncidentAction | None = None,
    access: WorkspaceAccess = IncidentWrite,
) -> IncidentRead:
    """The drifted definition becomes the baseline (snapshotted from n8n now, so what
    is accepted is what runs; a deletion: the workflow is no longer expected)."""
    incident: N8nDriftIncident = access.resource
    _unresolved(incident, "accepted")
    env = await uow.session.get(N8nEnvironment, incident.environment_id)
    environments.require_admin_for_protected(env, access.role, "accepting drift")
    current = None
    if incident.kind != "deleted":
        current = await snapshots.take(
            uow.session, workspace_id=incident.workspace_id, instance_id=incident.instance_id,
            n8n_workflow_id=incident.n8n_workflow_id, reason="drift", by_user_id=access.user.id,
            settings=settings, note="accepted drift",
        )  # fmt: skip
    await drift.accept(uow.session, incident, current, access.user.id, "accepted")
    await uow.session.flush()
    _log(uow, access, incident, "accept", body)
    return IncidentRead.model_validate(incident)


@router.post("/drift/incidents/{incident_id}/revert")
async def revert_incident(
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    body: IncidentAction | None = None,
    access: WorkspaceAccess = IncidentWrite,
) -> IncidentRead:
    """Put the baseline back on n8n (what is there is snapshotted first; a deleted
    workflow is created again; an added one is deleted, or archived where n8n keeps
    deletion to archived workflows). Not limited by allowed hours: it is the remedy."""
    incident: N8nDriftIncident = access.resource
    _unresolved(incident, "reverted")
    env = await uow.session.get(N8nEnvironment, incident.environment_id)
    environments.require_admin_for_protected(env, access.role, "reverting drift")
    await drift.revert(uow.session, settings, incident, access.user.id, "reverted")
    await uow.session.flush()
    _log(uow, access, incident, "revert", body)
    return IncidentRead.model_validate(incident)


def _log(
    uow: UnitOfWorkDep, access: WorkspaceAccess, incident: N8nDriftIncident, action: str,
    body: IncidentAction | None,
) -> None:  # fmt: skip
    from backend.activity.service import record

    record(uow.session, access.principal, workspace_id=incident.workspace_id,
           action=f"n8n.drift.{action}", resource_type="n8n_drift_incident",
           resource_id=incident.id,
           details={"n8n_workflow_id": incident.n8n_workflow_id, "kind": incident.kind,
                    "note": body.note if body else None})  # fmt: skip
