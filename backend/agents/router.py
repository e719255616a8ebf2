"""/api/v1/agents. Agents share the workflow permissions: reading, writing and deleting
them is workflow editing; a test turn calls the model (and spends money), so it takes
the execute permission, like running a workflow."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from backend.agents import service
from backend.agents.schemas import AgentCreate, AgentRead, AgentTest, AgentTestResult, AgentUpdate
from backend.auth.dependencies import SettingsDep, WorkspaceAccess, require
from backend.auth.permissions import Permission
from backend.kit.db import UnitOfWorkDep
from backend.kit.pagination import Page, PageParamsDep
from backend.models import Agent

router = APIRouter(prefix="/agents", tags=["agents"])


def _on(permission: Permission) -> WorkspaceAccess:
    result: WorkspaceAccess = require(permission, resource=Agent, param="agent_id")
    return result


@router.get("")
async def list_agents(
    uow: UnitOfWorkDep,
    page: PageParamsDep,
    q: Annotated[str | None, Query(max_length=200)] = None,
    access: WorkspaceAccess = require(Permission.WORKFLOWS_READ, scope="header"),
) -> Page[AgentRead]:
    items, total = await service.list_agents(uow, access, q=q, limit=page.limit, offset=page.offset)
    return Page(
        items=[AgentRead.model_validate(a) for a in items],
        total=total,
        limit=page.limit,
        offset=page.offset,
    )


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_agent(
    body: AgentCreate,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    access: WorkspaceAccess = require(Permission.WORKFLOWS_WRITE, scope="header"),
) -> AgentRead:
    return AgentRead.model_validate(await service.create(uow, settings, access, body))


@router.get("/{agent_id}")
async def get_agent(access: WorkspaceAccess = _on(Permission.WORKFLOWS_READ)) -> AgentRead:
    return AgentRead.model_validate(access.resource)


@router.patch("/{agent_id}")
async def update_agent(
    body: AgentUpdate, uow: UnitOfWorkDep, access: WorkspaceAccess = _on(Permission.WORKFLOWS_WRITE)
) -> AgentRead:
    return AgentRead.model_validate(await service.update(uow, access, body))


@router.delete("/{agent_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_agent(
    uow: UnitOfWorkDep, access: WorkspaceAccess = _on(Permission.WORKFLOWS_DELETE)
) -> None:
    await service.delete(uow, access)


@router.post(
    "/{agent_id}/test",
    responses={
        402: {"description": "The run went over its token or cost budget"},
        424: {"description": "No model provider key is configured"},
        502: {"description": "The model provider refused the request"},
        503: {"description": "The model provider is unreachable, or the run timed out"},
    },
)
async def try_agent(
    body: AgentTest,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    access: WorkspaceAccess = _on(Permission.WORKFLOWS_EXECUTE),
) -> AgentTestResult:
    return await service.test(uow, settings, access, body)
