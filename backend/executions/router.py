"""/api/v1/executions: start a run (202), follow it, cancel, retry, re-run."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, status
from fastapi.responses import JSONResponse

from backend.auth.dependencies import WorkspaceAccess, require
from backend.auth.permissions import Permission
from backend.executions import service
from backend.executions.schemas import (
    ExecutionAccepted,
    ExecutionBatchAccepted,
    ExecutionBatchCreate,
    ExecutionCreate,
    ExecutionLinks,
    ExecutionRead,
    LogEntry,
    NodeExecutionRead,
    TransitionRead,
)
from backend.kit.db import UnitOfWorkDep, read_only
from backend.kit.pagination import Page, PageParamsDep
from backend.models import Workflow, WorkflowExecution

router = APIRouter(prefix="/executions", tags=["executions"])
READ = Permission.WORKFLOWS_READ
EXECUTE = Permission.WORKFLOWS_EXECUTE
Status = service.E


def _on(permission: Permission) -> WorkspaceAccess:
    result: WorkspaceAccess = require(permission, resource=WorkflowExecution, param="execution_id")
    return result


def _to_run() -> WorkspaceAccess:
    # The workflow as the one row starting a run needs (service.workflow_to_run).
    result: WorkspaceAccess = require(
        EXECUTE,
        resource=Workflow,
        param="workflow_id",
        scope="body",
        load=service.workflow_to_run,
    )
    return result


def _accepted(request: Request, execution: WorkflowExecution) -> ExecutionAccepted:
    base = f"{request.scope.get('root_path', '')}/api/v1/executions/{execution.id}"
    return ExecutionAccepted(
        id=execution.id,
        status=execution.status,
        workflow_id=execution.workflow_id,
        version=execution.version,
        links=ExecutionLinks(
            self=base, nodes=f"{base}/nodes", logs=f"{base}/logs", cancel=f"{base}/cancel"
        ),
    )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        200: {
            "model": ExecutionAccepted | ExecutionRead,
            "description": "An earlier request with the same Idempotency-Key (its "
            "ExecutionAccepted), or, with `wait`, the run that ended in time (ExecutionRead)",
        },
        202: {"model": ExecutionAccepted, "description": "Admitted: the run is pending"},
    },
)
async def start_execution(
    request: Request,
    body: ExecutionCreate,
    uow: UnitOfWorkDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    wait: Annotated[
        float | None,
        Query(
            ge=0,
            le=600,
            description="Seconds to wait for the run to end (capped by ENGINE__MAX_WAIT_S): "
            "200 with the finished run if it ends in time, else 202 as without it",
        ),
    ] = None,
    access: WorkspaceAccess = _to_run(),
) -> JSONResponse:
    execution, created = await service.start(uow, access, body, idempotency_key)
    accepted = _accepted(request, execution)
    headers = {"Location": accepted.links.self}
    if wait:
        # The run must be committed and enqueued before anyone can wait for it.
        await uow.commit()
        limit = min(wait, request.app.state.settings.engine.max_wait_s)
        finished = await service.wait_for_end(uow, request.app.state.redis, execution.id, limit)
        if finished is not None:
            read = await service.read(uow, access, finished)
            return JSONResponse(read.model_dump(mode="json"), status_code=200, headers=headers)
    return JSONResponse(
        accepted.model_dump(mode="json"), status_code=202 if created else 200, headers=headers
    )


@router.post("/batch", status_code=status.HTTP_202_ACCEPTED)
async def start_executions(
    body: ExecutionBatchCreate,
    uow: UnitOfWorkDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    access: WorkspaceAccess = _to_run(),
) -> ExecutionBatchAccepted:
    """Start one run per item (up to 500) of one workflow in one request: one
    transaction, one publish of all the messages. For producers of volume."""
    ids = await service.start_many(uow, access, body, idempotency_key)
    workflow: Workflow = access.resource
    return ExecutionBatchAccepted(
        workflow_id=workflow.id, version=workflow.current_version, ids=ids
    )


@router.get("")
@read_only
async def list_executions(
    uow: UnitOfWorkDep,
    page: PageParamsDep,
    workflow_id: uuid.UUID | None = None,
    status_: Annotated[Status | None, Query(alias="status")] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    access: WorkspaceAccess = require(READ, scope="header"),
) -> Page[ExecutionRead]:
    items, total = await service.list_executions(
        uow,
        access,
        workflow_id=workflow_id,
        status=status_,
        since=since,
        until=until,
        limit=page.limit,
        offset=page.offset,
    )
    return Page(
        items=[ExecutionRead.model_validate(e) for e in items],
        total=total,
        limit=page.limit,
        offset=page.offset,
    )


@router.get("/{execution_id}")
@read_only
async def get_execution(uow: UnitOfWorkDep, access: WorkspaceAccess = _on(READ)) -> ExecutionRead:
    # The row was just read for the access check, in this request's own session.
    return await service.read(uow, access, access.resource)


@router.get("/{execution_id}/nodes")
@read_only
async def get_nodes(
    uow: UnitOfWorkDep, access: WorkspaceAccess = _on(READ)
) -> list[NodeExecutionRead]:
    return [
        NodeExecutionRead.model_validate(r)
        for r in await service.node_rows(uow.session, access.resource.id)
    ]


@router.get("/{execution_id}/history")
@read_only
async def get_history(
    uow: UnitOfWorkDep, access: WorkspaceAccess = _on(READ)
) -> list[TransitionRead]:
    """Every status change of the run and its nodes, oldest first: from, to, why, when,
    and by whom (a user, an API key, a worker's lease, the reaper, a trigger)."""
    return await service.transitions(uow, access)


@router.get("/{execution_id}/logs")
@read_only
async def get_logs(uow: UnitOfWorkDep, access: WorkspaceAccess = _on(READ)) -> list[LogEntry]:
    return await service.logs(uow, access)


@router.post("/{execution_id}/cancel", status_code=status.HTTP_202_ACCEPTED)
async def cancel_execution(
    uow: UnitOfWorkDep, access: WorkspaceAccess = _on(EXECUTE)
) -> ExecutionRead:
    await service.cancel(uow, access)
    return await service.read(uow, access)


@router.post("/{execution_id}/retry", status_code=status.HTTP_202_ACCEPTED)
async def retry_execution(
    request: Request, uow: UnitOfWorkDep, access: WorkspaceAccess = _on(EXECUTE)
) -> ExecutionAccepted:
    return _accepted(request, await service.retry(uow, access))


@router.post("/{execution_id}/rerun", status_code=status.HTTP_202_ACCEPTED)
async def rerun_execution(
    request: Request, uow: UnitOfWorkDep, access: WorkspaceAccess = _on(EXECUTE)
) -> ExecutionAccepted:
    return _accepted(request, await service.rerun(uow, access))
