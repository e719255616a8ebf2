"""/api/v1/workflows/{workflow_id}/triggers (read, enable/disable, signing secrets),
/api/v1/workflows/{workflow_id}/notifications (delivery records) and the public
/api/v1/hooks/{token} that starts webhook runs."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, status
from fastapi.responses import JSONResponse

from backend.auth.dependencies import LimiterDep, PublicRoute, SettingsDep, WorkspaceAccess, require
from backend.auth.permissions import Permission as P  # noqa: N817 - reads as a table
from backend.auth.permissions import allows
from backend.kit import signing
from backend.kit.crypto import hash_token
from backend.kit.db import UnitOfWorkDep
from backend.kit.middleware import read_capped
from backend.kit.pagination import Page, PageParamsDep
from backend.models import Trigger, Workflow
from backend.triggers import service, webhooks
from backend.triggers.schemas import (
    HookAccepted,
    HookFinished,
    NotificationRead,
    SecretCreated,
    TriggerRead,
)

router = APIRouter(prefix="/workflows/{workflow_id}", tags=["triggers"])
hooks = APIRouter(prefix="/hooks", tags=["webhooks"])
API = "/api/v1"
HEADERS = [signing.ID_HEADER, signing.TIMESTAMP_HEADER, signing.SIGNATURE_HEADER]


def _on(permission: P) -> WorkspaceAccess:
    result: WorkspaceAccess = require(permission, resource=Workflow, param="workflow_id")
    return result


def _read(
    request: Request, access: WorkspaceAccess, trigger: Trigger, next_count: int = 0
) -> TriggerRead:
    out = TriggerRead.model_validate(trigger)
    # The URL is the capability to run the workflow: shown only to whoever may run it
    # (a viewer read it and ran the workflow through it).
    if trigger.token and allows(access.role, P.WORKFLOWS_EXECUTE):
        out.webhook_url = str(request.base_url).rstrip("/") + f"{API}/hooks/{trigger.token}"
    out.has_secret = trigger.secret_encrypted is not None
    if next_count:
        out.next_fire_times = service.next_fire_times(trigger, next_count)
    return out


NextCount = Annotated[int, Query(alias="next", ge=0, le=50, description="next fire times")]


@router.get("/triggers")
async def list_triggers(
    request: Request,
    uow: UnitOfWorkDep,
    next_count: NextCount = 5,
    access: WorkspaceAccess = _on(P.WORKFLOWS_READ),
) -> list[TriggerRead]:
    triggers = await service.list_triggers(uow.session, access.resource)
    return [_read(request, access, t, next_count) for t in triggers]


@router.get("/triggers/{trigger_id}")
async def get_trigger(
    request: Request,
    trigger_id: uuid.UUID,
    uow: UnitOfWorkDep,
    next_count: NextCount = 5,
    access: WorkspaceAccess = _on(P.WORKFLOWS_READ),
) -> TriggerRead:
    return _read(
        request, access, await service.get(uow.session, access.resource, trigger_id), next_count
    )


@router.post("/triggers/{trigger_id}/enable")
async def enable_trigger(
    request: Request,
    trigger_id: uuid.UUID,
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = _on(P.WORKFLOWS_WRITE),
) -> TriggerRead:
    trigger = await service.set_enabled(access, uow.session, trigger_id, True)
    return _read(request, access, trigger, 5)


@router.post("/triggers/{trigger_id}/disable")
async def disable_trigger(
    request: Request,
    trigger_id: uuid.UUID,
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = _on(P.WORKFLOWS_WRITE),
) -> TriggerRead:
    trigger = await service.set_enabled(access, uow.session, trigger_id, False)
    return _read(request, access, trigger)


@router.post("/triggers/{trigger_id}/secret", status_code=status.HTTP_201_CREATED)
async def rotate_trigger_secret(
    trigger_id: uuid.UUID,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    access: WorkspaceAccess = _on(P.WORKFLOWS_WRITE),
) -> SecretCreated:
    """A new signing secret for a webhook trigger (the old one stops working). Shown
    only in this answer."""
    _, secret = await service.rotate_secret(access, uow.session, settings, trigger_id)
    return SecretCreated(secret=secret, header_names=HEADERS)


@router.get("/notifications")
async def list_notifications(
    uow: UnitOfWorkDep, page: PageParamsDep, access: WorkspaceAccess = _on(P.WORKFLOWS_READ)
) -> Page[NotificationRead]:
    items, total = await service.list_notifications(
        uow.session, access.resource, limit=page.limit, offset=page.offset
    )
    return Page(
        items=[NotificationRead.model_validate(n) for n in items],
        total=total,
        limit=page.limit,
        offset=page.offset,
    )


@router.post("/notifications/secret", status_code=status.HTTP_201_CREATED)
async def rotate_notification_secret(
    uow: UnitOfWorkDep, settings: SettingsDep, access: WorkspaceAccess = _on(P.WORKFLOWS_WRITE)
) -> SecretCreated:
    """A new key for this workflow's outgoing notification webhooks. Shown only here."""
    secret = await service.rotate_notification_secret(access, uow.session, settings)
    return SecretCreated(secret=secret, header_names=HEADERS)


@hooks.post(
    "/{token}",
    dependencies=[PublicRoute],
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        200: {"model": HookFinished, "description": "?wait: the run ended in time"},
        202: {"model": HookAccepted, "description": "Admitted: the run is pending"},
    },
)
async def receive_webhook(
    token: Annotated[str, Path(max_length=200)],
    request: Request,
    settings: SettingsDep,
    limiter: LimiterDep,
    wait: Annotated[
        float | None,
        Query(gt=0, allow_inf_nan=False, description="seconds to wait for the run"),
    ] = None,
) -> JSONResponse:
    await limiter.hit(settings.triggers.webhook_rate_limit, "hook", hash_token(token))
    body = await read_capped(request, settings.triggers.webhook_max_body_bytes)
    received = await webhooks.receive(
        request.app.state.sessionmaker,
        request.app.state.redis,
        settings,
        token=token,
        headers=dict(request.headers),
        body=body,
        wait_s=wait,
    )
    done = received.finished
    if done is not None:
        finished = HookFinished(
            execution_id=done.id, status=done.status, output=done.output, error=done.error
        )
        return JSONResponse(finished.model_dump(mode="json"), status_code=200)
    link = f"{API}/executions/{received.execution_id}"
    accepted = HookAccepted(
        execution_id=received.execution_id, status="pending", links={"execution": link}
    )
    return JSONResponse(accepted.model_dump(mode="json"), status_code=202)
