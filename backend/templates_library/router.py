"""/api/v1/templates: the built-in library plus the workspace's own (X-Workspace-ID)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, status

from backend.auth.dependencies import WorkspaceAccess, require
from backend.auth.permissions import Permission as P  # noqa: N817 - reads as a table
from backend.kit.db import UnitOfWorkDep
from backend.templates_library import service
from backend.templates_library.schemas import (
    Instantiate,
    Publish,
    TemplateList,
    TemplateRead,
    TemplateSummary,
)
from backend.workflows.schemas import WorkflowRead

router = APIRouter(prefix="/templates", tags=["templates"])
TemplateId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


@router.get("")
async def list_templates(
    uow: UnitOfWorkDep,
    category: Annotated[str | None, Query(max_length=50)] = None,
    access: WorkspaceAccess = require(P.WORKFLOWS_READ, scope="header"),
) -> TemplateList:
    items = await service.list_templates(uow, access, category)
    return TemplateList(items=[TemplateSummary.model_validate(i) for i in items], total=len(items))


@router.post("", status_code=status.HTTP_201_CREATED)
async def publish_template(
    body: Publish,
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = require(P.WORKFLOWS_WRITE, scope="header"),
) -> TemplateRead:
    """Publish one of this workspace's workflows as a template for its members."""
    return await service.publish(uow, access, body)


@router.get("/{template_id}")
async def get_template(
    template_id: TemplateId,
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = require(P.WORKFLOWS_READ, scope="header"),
) -> TemplateRead:
    return await service.get(uow, access, template_id)


@router.post("/{template_id}/instantiate", status_code=status.HTTP_201_CREATED)
async def instantiate(
    template_id: TemplateId,
    body: Instantiate,
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = require(P.WORKFLOWS_WRITE, scope="header"),
) -> WorkflowRead:
    """A validated draft workflow from the template, with the parameters filled in."""
    return await service.instantiate(uow, access, template_id, body)


@router.delete("/{template_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_template(
    template_id: TemplateId,
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = require(P.WORKFLOWS_DELETE, scope="header"),
) -> None:
    await service.delete(uow, access, template_id)
