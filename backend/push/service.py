"""A person's notifications: the inbox rows, their live delivery on the person's own
channel (`user:<id>` on the multiplexed socket), e-mail, and push to their devices (Web
Push, FCM), each as their preferences say. Other domains call `notify`; the pushes go
out from a worker (`notifications.push`) after the commit.

Kinds: `task.assigned` (a task someone may decide), `task.decided`, `run.failed` (a run
of a workflow they own or watch), `invitation` (to a workspace), `quota.warning` (to a
workspace's owners and administrators: backend/quotas/warnings), `n8n.error` (a failure an
n8n instance reported: backend/n8n/intake). Channels: `in_app`,
`email`, `web_push`, `fcm`. What a person has not switched off is on.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.kit.crypto import SecretBox, hash_token
from backend.kit.db import UnitOfWork
from backend.kit.errors import NotFound, ValidationFailed
from backend.kit.http_guard import guarded_client
from backend.kit.logging import get_logger
from backend.kit.mail import send_mail
from backend.kit.tasks import enqueue_after_commit
from backend.models import (
    NotificationPreference,
    PushSubscription,
    User,
    UserNotification,
    Workflow,
    WorkflowWatch,
)
from backend.push import senders
from backend.realtime.events import event_log

log = get_logger(__name__)
# Every kind people.notify is called with (a test checks each sender's kind is here).
KINDS = (
    "task.assigned",
    "task.decided",
    "run.failed",
    "invitation",
    "quota.warning",
    "n8n.error",
    "n8n_drift",
)
CHANNELS = ("in_app", "email", "web_push", "fcm")
PUSH_TASK = "notifications.push"
# One notice reaches at most this many people (a task open to a large workspace).
MAX_RECIPIENTS = 200


def user_channel(user_id: uuid.UUID | str) -> str:
    """The Redis channel a person's notices go out on (the socket's `user:<id>`)."""
    return f"usr:{user_id}"


def publish_to_users_after_commit(
    uow: UnitOfWork, user_ids: Sequence[uuid.UUID], event: dict[str, Any]
) -> None:
    """Best effort, like workspace notices: a client that missed one refetches."""
    if not user_ids:
        return
    text = json.dumps(
        {"timestamp": datetime.now(UTC).isoformat(), **event}, separators=(",", ":"), default=str
    )
    targets = list(dict.fromkeys(user_ids))

    async def publish() -> None:
        try:
            redis = event_log().redis
            for user_id in targets:
                await redis.publish(user_channel(user_id), text)
        except Exception:
            log.warning("notices.user_publish_failed", exc_info=True)

    publish.__name__ = "publish:user"
    uow.after_commit(publish)


def publish_to_workspace_after_commit(
    uow: UnitOfWork, workspace_id: uuid.UUID, event: dict[str, Any]
) -> None:
    from backend.realtime.events import workspace_channel

    text = json.dumps(
        {"timestamp": datetime.now(UTC).isoformat(), "workspace_id": str(workspace_id), **event},
        separators=(",", ":"),
        default=str,
    )

    async def publish() -> None:
        try:
            await event_log().redis.publish(workspace_channel(workspace_id), text)
        except Exception:
            log.warning("notices.workspace_publish_failed", exc_info=True)

    publish.__name__ = "publish:workspace"
    uow.after_commit(publish)


# Preferences ---------------------------------------------------------------------------------


def wants(preferences: dict[str, Any], kind: str, channel: str) -> bool:
    switches = preferences.get(kind)
    if isinstance(switches, dict) and isinstance(switches.get(channel), bool):
        return bool(switches[channel])
    return True


async def preferences_of(
    session: AsyncSession, user_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, dict[str, Any]]:
    rows = await session.execute(
        select(NotificationPreference.user_id, NotificationPreference.preferences).where(
            NotificationPreference.user_id.in_(list(user_ids))
        )
    )
    return {user_id: prefs for user_id, prefs in rows.all()}


async def get_preferences(session: AsyncSession, user_id: uuid.UUID) -> dict[str, dict[str, bool]]:
    stored = (await preferences_of(session, [user_id])).get(user_id, {})
    return {kind: {ch: wants(stored, kind, ch) for ch in CHANNELS} for kind in KINDS}


async def set_preferences(
    session: AsyncSession, user_id: uuid.UUID, changes: dict[str, dict[str, bool]]
) -> dict[str, dict[str, bool]]:
    for kind, switches in changes.items():
        if kind not in KINDS:
            raise ValidationFailed(f"unknown notification kind {kind!r}", field=kind)
        for channel in switches:
            if channel not in CHANNELS:
                raise ValidationFailed(
                    f"unknown channel {channel!r} (one of {', '.join(CHANNELS)})",
                    field=f"{kind}.{channel}",
                )
    stored = dict((await preferences_of(session, [user_id])).get(user_id, {}))
    for kind, switches in changes.items():
        stored[kind] = {**(stored.get(kind) or {}), **switches}
    await session.execute(
        insert(NotificationPreference)
        .values(id=uuid.uuid4(), user_id=user_id, preferences=stored)
        .on_conflict_do_update(
            index_elements=[NotificationPreference.user_id],
            set_={"preferences": stored, "updated_at": func.now()},
        )
    )
    return await get_preferences(session, user_id)


# Notifying -----------------------------------------------------------------------------------


async def notify(
    uow: UnitOfWork,
    settings: Settings,
    user_ids: Sequence[uuid.UUID],
    *,
    kind: str,
    title: str,
    body: str = "",
    data: dict[str, Any] | None = None,
    workspace_id: uuid.UUID | None = None,
    email: Callable[[User], tuple[str, str] | None] | None = None,
) -> list[uuid.UUID]:
    """Tell these people: an inbox row each (live on their channel), an e-mail if
    `email(user)` gives (subject, body), and pushes to their devices, each only where
    their preferences allow. Everything goes out after the commit. The notified ids."""
    targets = list(dict.fromkeys(user_ids))[:MAX_RECIPIENTS]
    if not targets:
        return []
    session = uow.session
    users = {
        u.id: u
        for u in await session.scalars(
            select(User).where(User.id.in_(targets), User.is_active.is_(True))
        )
    }
    prefs = await preferences_of(session, targets)
    data = data or {}
    notified: list[uuid.UUID] = []
    push_ids: list[str] = []
    for user_id in targets:
        user = users.get(user_id)
        if user is None:
            continue
        mine = prefs.get(user_id, {})
        if wants(mine, kind, "in_app"):
            row = UserNotification(
                id=uuid.uuid4(),
                user_id=user_id,
                workspace_id=workspace_id,
                kind=kind,
                title=title[:500],
                body=body,
                data=data,
            )
            session.add(row)
            notified.append(user_id)
            publish_to_users_after_commit(
                uow,
                [user_id],
                {
                    "type": "notification.created",
                    "notification": {
                        "id": str(row.id),
                        "kind": kind,
                        "title": row.title,
                        "body": body,
                        "data": data,
                        "workspace_id": str(workspace_id) if workspace_id else None,
                    },
                },
            )
        if email is not None and wants(mine, kind, "email"):
            composed = email(user)
            if composed is not None:
                send_mail(uow, settings, to=user.email, subject=composed[0], body=composed[1])
        channels = [c for c in ("web_push", "fcm") if wants(mine, kind, c)]
        if channels:
            push_ids.append(f"{user_id}:{','.join(channels)}")
    await session.flush()
    if push_ids:
        message = {"title": title[:200], "body": body[:1000], "kind": kind, **_strings(data)}
        enqueue_after_commit(
            uow, PUSH_TASK, push_ids, message, argsrepr=f"({len(push_ids)} people)"
        )
    return notified


def _strings(data: dict[str, Any]) -> dict[str, str]:
    """FCM data values must be strings; keep the small scalar ones."""
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, str | int | float | bool) and len(str(value)) <= 200:
            out[str(key)[:64]] = str(value)
    return out


async def deliver_pushes(
    sessionmaker: async_sessionmaker[AsyncSession],
    settings: Settings,
    targets: list[str],
    message: dict[str, str],
    http: httpx.AsyncClient | None = None,
) -> dict[str, int]:
    """Send one message to every device of these people (`<user id>:<channels>`); a
    subscription the push service says is gone is deleted. Counts by outcome."""
    wanted: dict[uuid.UUID, set[str]] = {}
    for target in targets:
        raw_user, _, channels = target.partition(":")
        try:
            wanted[uuid.UUID(raw_user)] = set(channels.split(","))
        except ValueError:
            continue
    text = {k: v for k, v in message.items() if k not in ("title", "body")}
    push = senders.Message(message.get("title", ""), message.get("body", ""), text)
    box = SecretBox(settings)
    counts: dict[str, int] = {}
    own_client = http is None
    client = http or guarded_client(
        settings.http.allow_private_networks, user_agent=settings.http.user_agent
    )
    try:
        async with sessionmaker() as session:
            subs = (
                await session.scalars(
                    select(PushSubscription).where(PushSubscription.user_id.in_(list(wanted)))
                )
            ).all()
        gone: list[uuid.UUID] = []
        sent: list[uuid.UUID] = []
        for sub in subs:
            if sub.kind not in wanted.get(sub.user_id, set()):
                continue
            secret = json.loads(box.open(sub.secret_encrypted))
            if sub.kind == "web_push":
                outcome = await senders.web_push(settings, client, secret, push)
            else:
                outcome = await senders.fcm_push(settings, client, secret["token"], push)
            counts[outcome] = counts.get(outcome, 0) + 1
            if outcome == "gone":
                gone.append(sub.id)
            elif outcome == "delivered":
                sent.append(sub.id)
        async with UnitOfWork(sessionmaker) as uow:
            if gone:
                await uow.session.execute(
                    delete(PushSubscription).where(PushSubscription.id.in_(gone))
                )
            if sent:
                await uow.session.execute(
                    update(PushSubscription)
                    .where(PushSubscription.id.in_(sent))
                    .values(last_sent_at=func.now())
                )
    finally:
        if own_client:
            await client.aclose()
    if counts.get("gone"):
        log.info("push.subscriptions_removed", count=counts["gone"])
    return counts


# Subscriptions -----------------------------------------------------------------------------


async def subscribe(
    session: AsyncSession,
    settings: Settings,
    user_id: uuid.UUID,
    *,
    kind: str,
    secret: dict[str, Any],
    address: str,
    label: str | None,
    origin: str | None,
) -> PushSubscription:
    """Register a device (again: the same device is one row, its keys refreshed)."""
    sealed = SecretBox(settings).seal(json.dumps(secret))
    address_hash = hash_token(f"{kind}:{address}")
    row = await session.scalar(
        insert(PushSubscription)
        .values(
            id=uuid.uuid4(),
            user_id=user_id,
            kind=kind,
            address_hash=address_hash,
            secret_encrypted=sealed,
            label=label,
            origin=origin,
        )
        .on_conflict_do_update(
            index_elements=[PushSubscription.user_id, PushSubscription.address_hash],
            set_={"secret_encrypted": sealed, "label": label, "updated_at": func.now()},
        )
        .returning(PushSubscription),
        execution_options={"populate_existing": True},
    )
    assert isinstance(row, PushSubscription)
    return row


async def unsubscribe(session: AsyncSession, user_id: uuid.UUID, sub_id: uuid.UUID) -> None:
    result = await session.execute(
        delete(PushSubscription).where(
            PushSubscription.id == sub_id, PushSubscription.user_id == user_id
        )
    )
    if not getattr(result, "rowcount", 0):
        raise NotFound("push subscription not found")


async def subscriptions(session: AsyncSession, user_id: uuid.UUID) -> Sequence[PushSubscription]:
    return (
        await session.scalars(
            select(PushSubscription)
            .where(PushSubscription.user_id == user_id)
            .order_by(PushSubscription.created_at)
        )
    ).all()


# Watching workflows --------------------------------------------------------------------------


async def watch(session: AsyncSession, user_id: uuid.UUID, workflow_id: uuid.UUID) -> None:
    await session.execute(
        insert(WorkflowWatch)
        .values(id=uuid.uuid4(), user_id=user_id, workflow_id=workflow_id)
        .on_conflict_do_nothing()
    )


async def unwatch(session: AsyncSession, user_id: uuid.UUID, workflow_id: uuid.UUID) -> None:
    await session.execute(
        delete(WorkflowWatch).where(
            WorkflowWatch.user_id == user_id, WorkflowWatch.workflow_id == workflow_id
        )
    )


async def watched(session: AsyncSession, user_id: uuid.UUID) -> list[uuid.UUID]:
    rows = await session.scalars(
        select(WorkflowWatch.workflow_id).where(WorkflowWatch.user_id == user_id)
    )
    return list(rows)


async def people_for_failures(session: AsyncSession, workflow_id: uuid.UUID) -> list[uuid.UUID]:
    """Who hears of a workflow's failed runs: its owner and its watchers."""
    owner = await session.scalar(select(Workflow.created_by).where(Workflow.id == workflow_id))
    watchers = await session.scalars(
        select(WorkflowWatch.user_id).where(WorkflowWatch.workflow_id == workflow_id)
    )
    return list(dict.fromkeys([*([owner] if owner else []), *watchers]))
