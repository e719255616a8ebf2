"""/api/v1/n8n: n8n instances of a workspace (key in, never out), their test and sync,
their workflows (with toggle) and executions (with retry), the error workflow we install
on them, their reported errors and watches; and the public intake
/api/v1/hooks/n8n/{token} their error workflows post to."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, status

from backend.auth.dependencies import LimiterDep, PublicRoute, SettingsDep, WorkspaceAccess, require
from backend.auth.permissions import Permission as P  # noqa: N817 - reads as a table
from backend.config import Settings
from backend.kit import bodies
from backend.kit.crypto import hash_token
from backend.kit.db import UnitOfWorkDep
from backend.kit.errors import ValidationFailed
from backend.kit.middleware import read_capped
from backend.kit.pagination import Page, PageParamsDep
from backend.models import N8nInstance
from backend.n8n import drift, environments, intake, service
from backend.n8n.env_router import router as environments_router
from backend.n8n.repository import paginate
from backend.n8n.schemas import (
    ErrorRead,
    ExecutionRead,
    ExecutionStatusFilter,
    InstallErrorWorkflow,
    InstallResult,
    InstanceCreate,
    InstanceCreated,
    InstancePatch,
    InstanceRead,
    IntakeAccepted,
    RetryRequest,
    SyncResult,
    TestResult,
    Toggle,
    WatchCreate,
    WatchRead,
    WorkflowDetail,
    WorkflowRead,
)

router = APIRouter(prefix="/n8n", tags=["n8n"])
hooks = APIRouter(prefix="/hooks/n8n", tags=["webhooks"])
N8nIdPath = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
Label = Annotated[str | None, Query(min_length=1, max_length=50)]


def _on(permission: P) -> WorkspaceAccess:
    result: WorkspaceAccess = require(permission, resource=N8nInstance, param="instance_id")
    return result


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _read(settings: Settings, request: Request, instance: N8nInstance) -> InstanceRead:
    out = InstanceRead.model_validate(instance)
    base = settings.n8n.intake_base_url or _base(request)
    out.intake_url = service.intake_url(settings, instance, base)
    return out


@router.get("/instances")
async def list_instances(
    request: Request,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    page: PageParamsDep,
    environment: Label = None,
    tag: Label = None,
    access: WorkspaceAccess = require(P.WORKFLOWS_READ, scope="header"),
) -> Page[InstanceRead]:
    items, total = await service.list_instances(
        uow.session, access.workspace.id, environment=environment, tag=tag,
        limit=page.limit, offset=page.offset,
    )  # fmt: skip
    return Page(
        items=[_read(settings, request, i) for i in items],
        total=total,
        limit=page.limit,
        offset=page.offset,
    )


@router.post("/instances", status_code=status.HTTP_201_CREATED)
async def create_instance(
    body: InstanceCreate,
    request: Request,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    access: WorkspaceAccess = require(P.WORKFLOWS_WRITE, scope="header"),
) -> InstanceCreated:
    """Connect an instance. The API key is sealed and never shown again; the answer
    carries, once, the secret that signs our webhooks about this instance's failures.
    Nothing is called yet: `POST .../test` checks URL and key."""
    instance, secret = await service.create(uow, settings, access, body)
    read = _read(settings, request, instance)
    return InstanceCreated(**read.model_dump(), webhook_secret=secret)


@router.get("/instances/{instance_id}")
async def get_instance(
    request: Request, settings: SettingsDep, access: WorkspaceAccess = _on(P.WORKFLOWS_READ)
) -> InstanceRead:
    return _read(settings, request, access.resource)


@router.patch("/instances/{instance_id}")
async def update_instance(
    body: InstancePatch,
    request: Request,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    access: WorkspaceAccess = _on(P.WORKFLOWS_WRITE),
) -> InstanceRead:
    """Change settings; an omitted `api_key` keeps the stored one."""
    return _read(settings, request, await service.update(uow, settings, access, body))


@router.delete("/instances/{instance_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_instance(
    uow: UnitOfWorkDep, access: WorkspaceAccess = _on(P.WORKFLOWS_WRITE)
) -> None:
    """Forget the instance and everything synced from it (n8n itself is not touched)."""
    await service.delete(uow, access)


@router.post("/instances/{instance_id}/test")
async def check_instance(
    request: Request,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    access: WorkspaceAccess = _on(P.WORKFLOWS_WRITE),
) -> TestResult:
    """Check the URL and key against n8n: its version and the read scopes the key holds.
    An instance that cannot be reached or refuses the key answers 200 with `ok: false`
    and the reason (it is the instance's state, not the request's)."""
    probe = await service.check(uow, settings, access)
    instance: N8nInstance = access.resource
    return TestResult(
        ok=probe is not None,
        status=instance.status,
        reason=instance.status_reason,
        n8n_version=instance.n8n_version,
        capabilities=instance.capabilities,
        instance=_read(settings, request, instance),
    )


@router.post("/instances/{instance_id}/refresh")
async def refresh_instance(
    request: Request,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    access: WorkspaceAccess = _on(P.WORKFLOWS_EXECUTE),
) -> SyncResult:
    """Sync now (beat does it every N8N__SYNC_INTERVAL_S). Counts against the
    workspace's `n8n_refreshes_per_day` (402 past it). A failed sync answers 200 with
    `ok: false` and keeps what was synced before."""
    outcome = await service.refresh(uow, settings, access)
    return SyncResult(
        ok=outcome.ok,
        status=outcome.status,
        reason=outcome.reason,
        workflows=outcome.workflows,
        workflows_removed=outcome.workflows_removed,
        executions=outcome.executions,
        executions_pending=outcome.executions_pending,
        instance=_read(settings, request, access.resource),
    )


@router.get("/instances/{instance_id}/workflows")
async def list_workflows(
    uow: UnitOfWorkDep,
    page: PageParamsDep,
    active: bool | None = None,
    tag: Label = None,
    q: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
    access: WorkspaceAccess = _on(P.WORKFLOWS_READ),
) -> Page[WorkflowRead]:
    bodies.check_text(q or "", "q", "query")
    stmt = service.workflows_query(access.resource.id, active=active, tag=tag, q=q)
    items, total = await paginate(uow.session, stmt, limit=page.limit, offset=page.offset)
    return Page(
        items=[WorkflowRead.model_validate(w) for w in items],
        total=total,
        limit=page.limit,
        offset=page.offset,
    )


@router.get("/instances/{instance_id}/workflows/{workflow_n8n_id}")
async def get_workflow(
    workflow_n8n_id: N8nIdPath, uow: UnitOfWorkDep, access: WorkspaceAccess = _on(P.WORKFLOWS_READ)
) -> WorkflowDetail:
    """One workflow with its n8n definition (nodes, connections, settings) as synced."""
    row = await service.workflow_by_n8n_id(uow.session, access.resource.id, workflow_n8n_id)
    return WorkflowDetail.model_validate(row)


@router.post("/instances/{instance_id}/workflows/{workflow_n8n_id}/toggle")
async def toggle_workflow(
    workflow_n8n_id: N8nIdPath,
    body: Toggle,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    access: WorkspaceAccess = _on(P.WORKFLOWS_WRITE),
) -> WorkflowRead:
    """Switch the workflow on (publish; activate on n8n 1.x) or off on the instance.
    Counts against `n8n_toggles_per_day` (402 past it); n8n's refusal is a 502 with its
    message (a workflow without a trigger cannot be published, say). A protected
    environment's workflows answer 409 `environment_protected` (promote instead)."""
    await environments.guard_direct_change(uow.session, access.resource.id, "toggle")
    row = await service.toggle(uow, settings, access, workflow_n8n_id, body.active)
    await drift.after_toggle(uow.session, access.resource.id, workflow_n8n_id, row.active)
    return WorkflowRead.model_validate(row)


@router.get("/instances/{instance_id}/executions")
async def list_executions(
    uow: UnitOfWorkDep,
    page: PageParamsDep,
    status_: Annotated[ExecutionStatusFilter | None, Query(alias="status")] = None,
    workflow_id: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=64,
            pattern=r"^[A-Za-z0-9_-]+$",
            description="the n8n id of a workflow",
        ),
    ] = None,
    access: WorkspaceAccess = _on(P.WORKFLOWS_READ),
) -> Page[ExecutionRead]:
    stmt = service.executions_query(access.resource.id, status=status_, workflow_n8n_id=workflow_id)
    items, total = await paginate(uow.session, stmt, limit=page.limit, offset=page.offset)
    return Page(
        items=[ExecutionRead.model_validate(e) for e in items],
        total=total,
        limit=page.limit,
        offset=page.offset,
    )


@router.post("/instances/{instance_id}/executions/{execution_n8n_id}/retry")
async def retry_execution(
    execution_n8n_id: N8nIdPath,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    body: RetryRequest | None = None,
    access: WorkspaceAccess = _on(P.WORKFLOWS_EXECUTE),
) -> ExecutionRead:
    """Retry the execution on the instance; answers the new execution."""
    load = body.load_workflow if body is not None else False
    row = await service.retry(uow, settings, access, execution_n8n_id, load_workflow=load)
    return ExecutionRead.model_validate(row)


@router.post("/instances/{instance_id}/install-error-workflow")
async def install_error_workflow(
    body: InstallErrorWorkflow,
    request: Request,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    access: WorkspaceAccess = _on(P.WORKFLOWS_WRITE),
) -> InstallResult:
    """Create (or update) and publish on the instance an error workflow (Error Trigger
    -> HTTP Request to this instance's intake URL), and make it the error workflow of
    the named workflows (or all synced ones). Safe to repeat. It edits workflows: a
    protected environment answers 409 `environment_protected`."""
    await environments.guard_direct_change(uow.session, access.resource.id, "edit")
    result = await service.install_error_workflow(uow, settings, access, body, _base(request))
    return InstallResult(**result)


@router.get("/instances/{instance_id}/errors")
async def list_errors(
    uow: UnitOfWorkDep, page: PageParamsDep, access: WorkspaceAccess = _on(P.WORKFLOWS_READ)
) -> Page[ErrorRead]:
    stmt = service.errors_query(access.resource.id)
    items, total = await paginate(uow.session, stmt, limit=page.limit, offset=page.offset)
    return Page(
        items=[ErrorRead.model_validate(e) for e in items],
        total=total,
        limit=page.limit,
        offset=page.offset,
    )


@router.get("/instances/{instance_id}/watches")
async def list_watches(
    uow: UnitOfWorkDep, access: WorkspaceAccess = _on(P.WORKFLOWS_READ)
) -> list[WatchRead]:
    """The caller's own watches on this instance."""
    rows = await service.watches_of(uow.session, access.resource.id, access.user.id)
    return [WatchRead.model_validate(w) for w in rows]


@router.post("/instances/{instance_id}/watches", status_code=status.HTTP_201_CREATED)
async def create_watch(
    body: WatchCreate, uow: UnitOfWorkDep, access: WorkspaceAccess = _on(P.WORKFLOWS_READ)
) -> WatchRead:
    """Hear about failures of one workflow of the instance, or of all (no id)."""
    return WatchRead.model_validate(await service.watch(uow, access, body.workflow_n8n_id))


@router.delete(
    "/instances/{instance_id}/watches/{watch_id}", status_code=status.HTTP_204_NO_CONTENT
)
async def delete_watch(
    watch_id: uuid.UUID, uow: UnitOfWorkDep, access: WorkspaceAccess = _on(P.WORKFLOWS_READ)
) -> None:
    await service.unwatch(uow, access, watch_id)


@hooks.post("/{token}", dependencies=[PublicRoute], status_code=status.HTTP_202_ACCEPTED)
async def receive_error(
    token: Annotated[str, Path(min_length=1, max_length=200)],
    request: Request,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    limiter: LimiterDep,
) -> IntakeAccepted:
    """Where an instance's error workflow reports a failure (the Error Trigger's JSON).
    The token is the address: unknown ones answer 404."""
    await limiter.hit(settings.n8n.intake_rate_limit, "n8n-intake", hash_token(token))
    raw = await read_capped(request, settings.n8n.intake_max_body_bytes)
    try:
        payload = bodies.loads(raw) if raw.strip() else None
    except ValueError as exc:
        raise ValidationFailed("the body is not valid JSON", field="body") from exc
    row, new = await intake.receive(uow, settings, token, payload)
    return IntakeAccepted(error_id=row.id, new=new)


# Environments, pipelines, snapshots and drift (issue 18): their own module.
router.include_router(environments_router)
