"""/api/v1/workflows: workspace from X-Workspace-ID (or an API key's own) for list,
create and import; from the workflow itself everywhere else."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, status

from backend.auth.dependencies import WorkspaceAccess, require
from backend.auth.permissions import Permission as P  # noqa: N817 - reads as a table
from backend.kit.db import UnitOfWorkDep, read_only
from backend.kit.errors import ValidationFailed
from backend.kit.pagination import MAX_DB_INT, Page, PageParamsDep
from backend.models import Workflow
from backend.workflows import service
from backend.workflows.schemas import (
    TAG_MAX_LENGTH,
    ExportDocument,
    ImportRequest,
    Sort,
    Status,
    StatusChange,
    VersionRead,
    VersionSummary,
    WorkflowCreate,
    WorkflowRead,
    WorkflowSummary,
    WorkflowUpdate,
)

router = APIRouter(prefix="/workflows", tags=["workflows"])


def _on(permission: P) -> WorkspaceAccess:
    result: WorkspaceAccess = require(permission, resource=Workflow, param="workflow_id")
    return result


def _if_match(value: str | None) -> int | None:
    if value is None:
        return None
    cleaned = value.strip().removeprefix("W/").strip('"')
    if not cleaned.isdigit():
        raise ValidationFailed("If-Match must be a workflow version number", field="If-Match")
    return int(cleaned)


@router.get("")
@read_only
async def list_workflows(
    uow: UnitOfWorkDep,
    page: PageParamsDep,
    status_: Annotated[Status | None, Query(alias="status")] = None,
    tag: Annotated[str | None, Query(max_length=TAG_MAX_LENGTH)] = None,
    q: Annotated[str | None, Query(max_length=200)] = None,
    sort: Sort = "-updated_at",
    access: WorkspaceAccess = require(P.WORKFLOWS_READ, scope="header"),
) -> Page[WorkflowSummary]:
    items, total = await service.list_workflows(
        uow, access, status=status_, tag=tag, q=q, sort=sort, limit=page.limit, offset=page.offset
    )
    return Page(items=items, total=total, limit=page.limit, offset=page.offset)


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_workflow(
    body: WorkflowCreate,
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = require(P.WORKFLOWS_WRITE, scope="header"),
) -> WorkflowRead:
    return await service.create(uow, access, body)


@router.post("/import", status_code=status.HTTP_201_CREATED)
async def import_workflow(
    body: ImportRequest,
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = require(P.WORKFLOWS_WRITE, scope="header"),
) -> WorkflowRead:
    return await service.import_workflow(uow, access, body)


@router.get("/{workflow_id}")
@read_only
async def get_workflow(
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = require(
        P.WORKFLOWS_READ, resource=Workflow, param="workflow_id", load=service.load_for_read
    ),
) -> WorkflowRead:
    return await service.get(uow, access)


@router.put("/{workflow_id}")
async def update_workflow(
    body: WorkflowUpdate,
    uow: UnitOfWorkDep,
    if_match: Annotated[
        str | None,
        Header(
            pattern=r'^\s*(W/)?"?[0-9]{1,9}"?\s*$',
            description="the workflow version you edited",
        ),
    ] = None,
    access: WorkspaceAccess = _on(P.WORKFLOWS_WRITE),
) -> WorkflowRead:
    return await service.update(uow, access, body, _if_match(if_match))


@router.delete("/{workflow_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_workflow(
    uow: UnitOfWorkDep, access: WorkspaceAccess = _on(P.WORKFLOWS_DELETE)
) -> None:
    await service.delete(uow, access)


@router.patch("/{workflow_id}/status")
async def change_status(
    body: StatusChange, uow: UnitOfWorkDep, access: WorkspaceAccess = _on(P.WORKFLOWS_WRITE)
) -> WorkflowRead:
    return await service.change_status(uow, access, body.status)


@router.post("/{workflow_id}/duplicate", status_code=status.HTTP_201_CREATED)
async def duplicate(
    uow: UnitOfWorkDep, access: WorkspaceAccess = _on(P.WORKFLOWS_WRITE)
) -> WorkflowRead:
    return await service.duplicate(uow, access)


@router.get("/{workflow_id}/versions")
async def list_versions(
    uow: UnitOfWorkDep, page: PageParamsDep, access: WorkspaceAccess = _on(P.WORKFLOWS_READ)
) -> Page[VersionSummary]:
    items, total = await service.list_versions(uow, access, limit=page.limit, offset=page.offset)
    return Page(
        items=[VersionSummary.model_validate(v) for v in items],
        total=total,
        limit=page.limit,
        offset=page.offset,
    )


@router.get("/{workflow_id}/versions/{number}")
async def get_version(
    number: Annotated[int, Path(ge=1, le=MAX_DB_INT)],
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = _on(P.WORKFLOWS_READ),
) -> VersionRead:
    return VersionRead.model_validate(await service.get_version(uow, access, number))


@router.get("/{workflow_id}/export")
async def export(
    uow: UnitOfWorkDep, access: WorkspaceAccess = _on(P.WORKFLOWS_READ)
) -> ExportDocument:
    return await service.export(uow, access)
