"""/api/v1/auth and /api/v1/workspaces/{id}/api-keys."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, status

from backend.auth import service
from backend.auth.dependencies import (
    CurrentUser,
    LimiterDep,
    PublicRoute,
    SettingsDep,
    WorkspaceAccess,
    require,
)
from backend.auth.permissions import Permission
from backend.auth.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyRead,
    RefreshRequest,
    RequestOtp,
    RequestOtpResult,
    TokenPair,
    UserRead,
    UserUpdate,
    VerifyOtp,
)
from backend.kit.db import UnitOfWorkDep

router = APIRouter(prefix="/auth", tags=["auth"])
api_keys = APIRouter(prefix="/workspaces/{workspace_id}/api-keys", tags=["api-keys"])


@router.post("/request-otp", dependencies=[PublicRoute])
async def request_otp(
    body: RequestOtp, uow: UnitOfWorkDep, settings: SettingsDep, limiter: LimiterDep
) -> RequestOtpResult:
    ttl = await service.request_otp(uow, settings, limiter, email=body.email, purpose=body.purpose)
    return RequestOtpResult(expires_in=ttl)


@router.post("/verify-otp", dependencies=[PublicRoute])
async def verify_otp(
    body: VerifyOtp, uow: UnitOfWorkDep, settings: SettingsDep, limiter: LimiterDep
) -> TokenPair:
    return await service.verify_otp(uow, settings, limiter, email=body.email, code=body.code)


@router.post("/refresh", dependencies=[PublicRoute])
async def refresh(body: RefreshRequest, uow: UnitOfWorkDep, settings: SettingsDep) -> TokenPair:
    return await service.refresh(uow, settings, body.refresh_token)


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT)
async def logout(principal: CurrentUser, uow: UnitOfWorkDep) -> None:
    await service.logout(uow, principal)


@router.get("/me")
async def me(principal: CurrentUser) -> UserRead:
    return UserRead.model_validate(principal.user)


@router.patch("/me")
async def update_me(body: UserUpdate, principal: CurrentUser, uow: UnitOfWorkDep) -> UserRead:
    return UserRead.model_validate(await service.update_me(uow, principal, body))


@api_keys.post("", status_code=status.HTTP_201_CREATED)
async def create_api_key(
    body: ApiKeyCreate,
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = require(Permission.API_KEYS_MANAGE),
) -> ApiKeyCreated:
    api_key, key = await service.create_api_key(uow, access, body)
    return ApiKeyCreated(**ApiKeyRead.model_validate(api_key).model_dump(), key=key)


@api_keys.get("")
async def list_api_keys(
    uow: UnitOfWorkDep, access: WorkspaceAccess = require(Permission.API_KEYS_MANAGE)
) -> list[ApiKeyRead]:
    return [ApiKeyRead.model_validate(k) for k in await service.list_api_keys(uow, access)]


@api_keys.delete("/{key_id}", status_code=status.HTTP_204_NO_CONTENT)
async def revoke_api_key(
    key_id: uuid.UUID,
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = require(Permission.API_KEYS_MANAGE),
) -> None:
    await service.revoke_api_key(uow, access, key_id)
