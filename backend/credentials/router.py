"""/api/v1/credentials: metadata out, secrets in, never the other way round."""

from __future__ import annotations

from fastapi import APIRouter, status

from backend.auth.dependencies import SettingsDep, WorkspaceAccess, require
from backend.auth.permissions import Permission
from backend.credentials import service
from backend.credentials.schemas import CredentialCreate, CredentialRead, CredentialUpdate
from backend.kit.db import UnitOfWorkDep
from backend.kit.pagination import Page, PageParamsDep
from backend.models import Credential

router = APIRouter(prefix="/credentials", tags=["credentials"])
READ = Permission.CREDENTIALS_READ
WRITE = Permission.CREDENTIALS_WRITE


def _on(permission: Permission) -> WorkspaceAccess:
    result: WorkspaceAccess = require(permission, resource=Credential, param="credential_id")
    return result


@router.get("")
async def list_credentials(
    uow: UnitOfWorkDep, page: PageParamsDep, access: WorkspaceAccess = require(READ, scope="header")
) -> Page[CredentialRead]:
    items, total = await service.list_credentials(uow, access, limit=page.limit, offset=page.offset)
    return Page(
        items=[CredentialRead.model_validate(c) for c in items],
        total=total,
        limit=page.limit,
        offset=page.offset,
    )


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_credential(
    body: CredentialCreate,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    access: WorkspaceAccess = require(WRITE, scope="header"),
) -> CredentialRead:
    return CredentialRead.model_validate(await service.create(uow, settings, access, body))


@router.get("/{credential_id}")
async def get_credential(access: WorkspaceAccess = _on(READ)) -> CredentialRead:
    return CredentialRead.model_validate(access.resource)


@router.patch("/{credential_id}")
async def update_credential(
    body: CredentialUpdate,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    access: WorkspaceAccess = _on(WRITE),
) -> CredentialRead:
    return CredentialRead.model_validate(await service.update(uow, settings, access, body))


@router.delete("/{credential_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_credential(uow: UnitOfWorkDep, access: WorkspaceAccess = _on(WRITE)) -> None:
    await service.delete(uow, access)
