"""/api/v1/mcp: MCP servers of a workspace (secrets in, never out), connect/disconnect,
their tools and the approval of changed ones, and server templates."""

from __future__ import annotations

from fastapi import APIRouter, status

from backend.auth.dependencies import CurrentUser, SettingsDep, WorkspaceAccess, require
from backend.auth.permissions import Permission
from backend.kit.db import UnitOfWorkDep
from backend.kit.pagination import Page, PageParamsDep
from backend.mcp import service
from backend.mcp.schemas import (
    ApproveTools,
    ConnectResult,
    McpServerCreate,
    McpServerPatch,
    McpServerPut,
    McpServerRead,
    McpToolRead,
    Template,
)
from backend.mcp.templates import templates
from backend.models import McpServer

router = APIRouter(prefix="/mcp", tags=["mcp"])
READ = Permission.WORKFLOWS_READ
WRITE = Permission.WORKFLOWS_WRITE


def _on(permission: Permission) -> WorkspaceAccess:
    result: WorkspaceAccess = require(permission, resource=McpServer, param="server_id")
    return result


@router.get("/templates")
async def list_templates(_: CurrentUser, settings: SettingsDep) -> list[Template]:
    return templates(settings)


@router.get("/servers")
async def list_servers(
    uow: UnitOfWorkDep, page: PageParamsDep, access: WorkspaceAccess = require(READ, scope="header")
) -> Page[McpServerRead]:
    items, total = await service.list_servers(uow, access, limit=page.limit, offset=page.offset)
    return Page(
        items=[McpServerRead.model_validate(s) for s in items],
        total=total,
        limit=page.limit,
        offset=page.offset,
    )


@router.post("/servers", status_code=status.HTTP_201_CREATED)
async def create_server(
    body: McpServerCreate,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    access: WorkspaceAccess = require(WRITE, scope="header"),
) -> McpServerRead:
    return McpServerRead.model_validate(await service.create(uow, settings, access, body))


@router.get("/servers/{server_id}")
async def get_server(access: WorkspaceAccess = _on(READ)) -> McpServerRead:
    return McpServerRead.model_validate(access.resource)


@router.put("/servers/{server_id}")
async def replace_server(
    body: McpServerPut,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    access: WorkspaceAccess = _on(WRITE),
) -> McpServerRead:
    return McpServerRead.model_validate(await service.update(uow, settings, access, body))


@router.patch("/servers/{server_id}")
async def update_server(
    body: McpServerPatch,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    access: WorkspaceAccess = _on(WRITE),
) -> McpServerRead:
    return McpServerRead.model_validate(await service.update(uow, settings, access, body))


@router.delete("/servers/{server_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_server(uow: UnitOfWorkDep, access: WorkspaceAccess = _on(WRITE)) -> None:
    await service.delete(uow, access)


@router.post("/servers/{server_id}/connect")
async def connect_server(
    uow: UnitOfWorkDep, settings: SettingsDep, access: WorkspaceAccess = _on(WRITE)
) -> ConnectResult:
    """Handshake and tool discovery. A server that cannot be reached answers 200 with
    `server.status: "error"` and the reason (the failure is the server's state, not the
    request's)."""
    server, sync = await service.connect(uow, settings, access)
    return ConnectResult(
        server=McpServerRead.model_validate(server),
        tools=[McpToolRead.model_validate(t) for t in sync.tools],
        changed=sync.changed,
        added=sync.added,
        removed=sync.removed,
    )


@router.post("/servers/{server_id}/disconnect")
async def disconnect_server(
    uow: UnitOfWorkDep, access: WorkspaceAccess = _on(WRITE)
) -> McpServerRead:
    return McpServerRead.model_validate(await service.disconnect(uow, access))


@router.get("/servers/{server_id}/tools")
async def list_tools(uow: UnitOfWorkDep, access: WorkspaceAccess = _on(READ)) -> list[McpToolRead]:
    return [
        McpToolRead.model_validate(t)
        for t in await service.tools_of(uow.session, access.resource.id)
    ]


@router.post("/servers/{server_id}/tools/approve")
async def approve_tools(
    body: ApproveTools, uow: UnitOfWorkDep, access: WorkspaceAccess = _on(WRITE)
) -> list[McpToolRead]:
    return [McpToolRead.model_validate(t) for t in await service.approve(uow, access, body)]
