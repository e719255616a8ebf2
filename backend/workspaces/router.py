"""/api/v1/workspaces (with members, invitations and activity) and /api/v1/invitations."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, status

from backend.activity.service import list_for_workspace
from backend.auth.dependencies import (
    CurrentUser,
    LimiterDep,
    SettingsDep,
    WorkspaceAccess,
    require,
)
from backend.auth.permissions import Permission, Role
from backend.kit.db import UnitOfWorkDep
from backend.kit.pagination import Page, PageParamsDep
from backend.workspaces import service
from backend.workspaces.schemas import (
    ActivityRead,
    InvitationForMe,
    InvitationRead,
    InviteCreate,
    MemberRead,
    MemberUpdate,
    WorkspaceCreate,
    WorkspaceUpdate,
    WorkspaceWithRole,
)

router = APIRouter(prefix="/workspaces", tags=["workspaces"])
invitations = APIRouter(prefix="/invitations", tags=["invitations"])


@router.get("")
async def list_workspaces(
    principal: CurrentUser, uow: UnitOfWorkDep, page: PageParamsDep
) -> Page[WorkspaceWithRole]:
    items, total = await service.list_mine(uow, principal, limit=page.limit, offset=page.offset)
    return Page(items=items, total=total, limit=page.limit, offset=page.offset)


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_workspace(
    body: WorkspaceCreate, principal: CurrentUser, uow: UnitOfWorkDep
) -> WorkspaceWithRole:
    return await service.create_workspace(uow, principal, body)


@router.get("/{workspace_id}")
async def get_workspace(
    access: WorkspaceAccess = require(Permission.WORKSPACE_READ),
) -> WorkspaceWithRole:
    return service.read(access)


@router.patch("/{workspace_id}")
async def update_workspace(
    body: WorkspaceUpdate,
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = require(Permission.WORKSPACE_SETTINGS),
) -> WorkspaceWithRole:
    return await service.update_workspace(uow, access, body)


@router.delete("/{workspace_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_workspace(
    uow: UnitOfWorkDep, access: WorkspaceAccess = require(Permission.WORKSPACE_DELETE)
) -> None:
    await service.delete_workspace(uow, access)


@router.get("/{workspace_id}/members")
async def list_members(
    uow: UnitOfWorkDep,
    page: PageParamsDep,
    access: WorkspaceAccess = require(Permission.MEMBERS_READ),
) -> Page[MemberRead]:
    items, total = await service.list_members(uow, access, limit=page.limit, offset=page.offset)
    return Page(items=items, total=total, limit=page.limit, offset=page.offset)


@router.patch("/{workspace_id}/members/{user_id}")
async def change_member_role(
    user_id: uuid.UUID,
    body: MemberUpdate,
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = require(Permission.MEMBERS_CHANGE_ROLE),
) -> MemberRead:
    return await service.change_role(uow, access, user_id, body.role)


@router.delete("/{workspace_id}/members/{user_id}", status_code=status.HTTP_204_NO_CONTENT)
async def remove_member(
    user_id: uuid.UUID,
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = require(Permission.MEMBERS_REMOVE),
) -> None:
    await service.remove_member(uow, access, user_id)


@router.post("/{workspace_id}/invite", status_code=status.HTTP_201_CREATED)
async def invite(
    body: InviteCreate,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    limiter: LimiterDep,
    access: WorkspaceAccess = require(Permission.MEMBERS_INVITE),
) -> InvitationRead:
    invitation, _ = await service.invite(uow, settings, limiter, access, body)
    return InvitationRead.model_validate(invitation)


@router.get("/{workspace_id}/invitations")
async def pending_invitations(
    uow: UnitOfWorkDep, access: WorkspaceAccess = require(Permission.MEMBERS_INVITE)
) -> list[InvitationRead]:
    return [
        InvitationRead.model_validate(i) for i in await service.pending_invitations(uow, access)
    ]


@router.delete(
    "/{workspace_id}/invitations/{invitation_id}", status_code=status.HTTP_204_NO_CONTENT
)
async def revoke_invitation(
    invitation_id: uuid.UUID,
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = require(Permission.MEMBERS_INVITE),
) -> None:
    await service.revoke_invitation(uow, access, invitation_id)


@router.get("/{workspace_id}/activity")
async def activity(
    uow: UnitOfWorkDep,
    page: PageParamsDep,
    action: Annotated[
        str | None, Query(max_length=80, description="exact action, or a prefix ending in '.'")
    ] = None,
    resource_type: Annotated[str | None, Query(max_length=40)] = None,
    user_id: uuid.UUID | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    access: WorkspaceAccess = require(Permission.ACTIVITY_READ),
) -> Page[ActivityRead]:
    items, total = await list_for_workspace(
        uow.session, access.workspace.id, limit=page.limit, offset=page.offset,
        action=action, resource_type=resource_type, user_id=user_id, since=since, until=until,
    )  # fmt: skip
    # Where people connect from is for administrators; editors see what happened.
    private = not access.role.at_least(Role.ADMINISTRATOR)
    return Page(
        items=[
            ActivityRead.model_validate(a).model_copy(
                update={"ip": None, "user_agent": None} if private else {}
            )
            for a in items
        ],
        total=total,
        limit=page.limit,
        offset=page.offset,
    )


@invitations.get("")
async def my_invitations(principal: CurrentUser, uow: UnitOfWorkDep) -> list[InvitationForMe]:
    return [
        InvitationForMe(**InvitationRead.model_validate(inv).model_dump(), workspace_name=name)
        for inv, name in await service.my_invitations(uow, principal)
    ]


@invitations.post("/{token}/accept")
async def accept_invitation(
    token: str, principal: CurrentUser, uow: UnitOfWorkDep
) -> WorkspaceWithRole:
    return await service.accept_invitation(uow, principal, token)
