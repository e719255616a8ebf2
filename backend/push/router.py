"""/api/v1/notifications: a signed-in person's inbox of notices, their preferences per
kind and channel, the workflows they watch, and the devices their pushes go to (Web
Push subscriptions, FCM device tokens)."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select, update

from backend.auth.dependencies import CurrentUser, SettingsDep, WorkspaceAccess, require
from backend.auth.permissions import Permission
from backend.kit.db import UnitOfWorkDep
from backend.kit.errors import NotConfigured, NotFound, ValidationFailed
from backend.kit.pagination import Page, PageParamsDep
from backend.models import UserNotification, Workflow
from backend.push import senders, service

router = APIRouter(prefix="/notifications", tags=["notifications"])


class NotificationRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    kind: str
    title: str
    body: str
    data: dict[str, Any]
    workspace_id: uuid.UUID | None
    read_at: datetime | None
    created_at: datetime


class WebPushKeys(BaseModel):
    model_config = ConfigDict(extra="forbid")

    p256dh: str = Field(min_length=20, max_length=200)
    auth: str = Field(min_length=8, max_length=100)


class WebPushSubscriptionCreate(BaseModel):
    """What a browser's PushManager.subscribe() gives (PushSubscription.toJSON())."""

    model_config = ConfigDict(extra="forbid")

    endpoint: str = Field(pattern=r"^https?://[^\s]+$", max_length=2000)
    keys: WebPushKeys
    expirationTime: int | None = None  # noqa: N815 (the browser's own field name)
    label: str | None = Field(default=None, max_length=200)


class DeviceCreate(BaseModel):
    """A mobile app's FCM registration token."""

    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=20, max_length=4096, pattern=r"^[A-Za-z0-9_:\-.]+$")
    platform: Literal["android", "ios", "web"] | None = None
    label: str | None = Field(default=None, max_length=200)


class SubscriptionRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    kind: str
    label: str | None
    origin: str | None
    last_sent_at: datetime | None
    created_at: datetime


Preferences = dict[str, dict[str, bool]]


def _b64url(value: str, size: int, field: str) -> None:
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise ValidationFailed("not base64url", field=field) from None
    if len(raw) != size:
        raise ValidationFailed(f"must decode to {size} bytes", field=field)


@router.get("")
async def list_notifications(
    uow: UnitOfWorkDep,
    page: PageParamsDep,
    principal: CurrentUser,
    unread: Annotated[bool, Query(description="only those not read yet")] = False,
) -> Page[NotificationRead]:
    stmt = select(UserNotification).where(UserNotification.user_id == principal.user.id)
    if unread:
        stmt = stmt.where(UserNotification.read_at.is_(None))
    total = await uow.session.scalar(select(func.count()).select_from(stmt.subquery()))
    rows = await uow.session.scalars(
        stmt.order_by(UserNotification.created_at.desc(), UserNotification.id)
        .limit(page.limit)
        .offset(page.offset)
    )
    return Page(
        items=[NotificationRead.model_validate(r) for r in rows],
        total=int(total or 0),
        limit=page.limit,
        offset=page.offset,
    )


@router.post("/{notification_id}/read")
async def mark_read(
    notification_id: uuid.UUID, uow: UnitOfWorkDep, principal: CurrentUser
) -> NotificationRead:
    row = await uow.session.get(UserNotification, notification_id)
    if row is None or row.user_id != principal.user.id:
        raise NotFound("notification not found")
    row.read_at = row.read_at or datetime.now(UTC)
    await uow.session.flush()
    return NotificationRead.model_validate(row)


@router.post("/read-all")
async def mark_all_read(uow: UnitOfWorkDep, principal: CurrentUser) -> dict[str, int]:
    result = await uow.session.execute(
        update(UserNotification)
        .where(UserNotification.user_id == principal.user.id, UserNotification.read_at.is_(None))
        .values(read_at=func.now())
    )
    return {"read": int(getattr(result, "rowcount", 0) or 0)}


@router.get("/preferences")
async def get_preferences(uow: UnitOfWorkDep, principal: CurrentUser) -> Preferences:
    """{kind: {channel: on}} for every kind and channel (unset ones are on)."""
    return await service.get_preferences(uow.session, principal.user.id)


@router.put("/preferences")
async def set_preferences(
    body: Preferences, uow: UnitOfWorkDep, principal: CurrentUser
) -> Preferences:
    """Switch channels per kind: `{"run.failed": {"email": false}}`; what is not sent
    stays as it was."""
    return await service.set_preferences(uow.session, principal.user.id, body)


# Push --------------------------------------------------------------------------------------


@router.get(
    "/push-key",
    responses={424: {"description": "Web Push is not configured (PUSH__VAPID_PUBLIC_KEY)"}},
)
async def push_key(settings: SettingsDep, principal: CurrentUser) -> dict[str, str]:
    """The VAPID public key a browser subscribes with (applicationServerKey)."""
    if not settings.push.vapid_public_key:
        raise NotConfigured("Web Push is not configured (PUSH__VAPID_PUBLIC_KEY)")
    return {"vapid_public_key": settings.push.vapid_public_key}


@router.post("/push-subscriptions", status_code=status.HTTP_201_CREATED)
async def add_web_push(
    body: WebPushSubscriptionCreate,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    principal: CurrentUser,
) -> SubscriptionRead:
    """Register a browser (the same endpoint again refreshes its keys)."""
    _b64url(body.keys.p256dh, 65, "keys.p256dh")
    _b64url(body.keys.auth, 16, "keys.auth")
    secret = {"endpoint": body.endpoint, "keys": body.keys.model_dump()}
    row = await service.subscribe(
        uow.session,
        settings,
        principal.user.id,
        kind="web_push",
        secret=secret,
        address=body.endpoint,
        label=body.label,
        origin=senders.origin_of(body.endpoint)[:300],
    )
    return SubscriptionRead.model_validate(row)


@router.post("/devices", status_code=status.HTTP_201_CREATED)
async def add_device(
    body: DeviceCreate, uow: UnitOfWorkDep, settings: SettingsDep, principal: CurrentUser
) -> SubscriptionRead:
    """Register a mobile device's FCM token."""
    row = await service.subscribe(
        uow.session,
        settings,
        principal.user.id,
        kind="fcm",
        secret={"token": body.token},
        address=body.token,
        label=body.label or body.platform,
        origin=None,
    )
    return SubscriptionRead.model_validate(row)


@router.get("/push-subscriptions")
async def list_subscriptions(uow: UnitOfWorkDep, principal: CurrentUser) -> list[SubscriptionRead]:
    """Both kinds (web_push, fcm); never the endpoint's secret part or a token."""
    rows = await service.subscriptions(uow.session, principal.user.id)
    return [SubscriptionRead.model_validate(r) for r in rows]


@router.delete("/push-subscriptions/{subscription_id}", status_code=status.HTTP_204_NO_CONTENT)
async def remove_subscription(
    subscription_id: uuid.UUID, uow: UnitOfWorkDep, principal: CurrentUser
) -> None:
    await service.unsubscribe(uow.session, principal.user.id, subscription_id)


# Watching ----------------------------------------------------------------------------------


@router.get("/watches")
async def list_watches(uow: UnitOfWorkDep, principal: CurrentUser) -> list[uuid.UUID]:
    return await service.watched(uow.session, principal.user.id)


@router.put("/watches/{workflow_id}", status_code=status.HTTP_204_NO_CONTENT)
async def watch_workflow(
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = require(
        Permission.WORKFLOWS_READ, resource=Workflow, param="workflow_id"
    ),
) -> None:
    """Hear about this workflow's failed runs (its owner always does)."""
    await service.watch(uow.session, access.user.id, access.resource.id)


@router.delete("/watches/{workflow_id}", status_code=status.HTTP_204_NO_CONTENT)
async def unwatch_workflow(
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = require(
        Permission.WORKFLOWS_READ, resource=Workflow, param="workflow_id"
    ),
) -> None:
    await service.unwatch(uow.session, access.user.id, access.resource.id)
