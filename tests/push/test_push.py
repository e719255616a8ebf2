"""Push to people's devices through the real protocols against loopback services:
Web Push (the service checks the VAPID JWT and the test decrypts the RFC 8291 body with
the browser's keys) and FCM HTTP v1 (a service-account token from its token endpoint,
then messages:send); gone subscriptions are deleted; the SSRF guard holds."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.permissions import Role
from backend.config import Settings
from backend.kit.db import UnitOfWork
from backend.kit.http_guard import guarded_client
from backend.models import PushSubscription, Workspace
from backend.push import service
from tests.push.loopback import PushService, push_service, vapid_keys
from tests.support.asgi import client_for
from tests.support.identity import Actor, member

PRIVATE, PUBLIC = vapid_keys()


@pytest.fixture(scope="module")
def pushes() -> Iterator[PushService]:
    with push_service() as s:
        yield s


@pytest.fixture
def push_settings(settings: Settings, pushes: PushService) -> Settings:
    push = settings.push.model_copy(
        update={
            "vapid_private_key": SecretStr(PRIVATE),
            "vapid_public_key": PUBLIC,
            "fcm_service_account": SecretStr(json.dumps(pushes.service_account())),
            "fcm_endpoint": pushes.base,
        }
    )
    http = settings.http.model_copy(update={"allow_private_networks": ["127.0.0.1/32"]})
    return settings.model_copy(update={"push": push, "http": http})


@pytest.fixture
async def person(
    maker: async_sessionmaker[AsyncSession], settings: Settings, workspace: Workspace
) -> Actor:
    async with UnitOfWork(maker) as uow:
        return await member(uow.session, settings, workspace, Role.EDITOR)


async def _subscriptions(maker: async_sessionmaker[AsyncSession], user_id: uuid.UUID) -> int:
    async with maker() as session:
        rows = await session.scalars(
            select(PushSubscription).where(PushSubscription.user_id == user_id)
        )
        return len(rows.all())


async def test_a_web_push_arrives_signed_and_decryptable_and_a_gone_one_is_removed(
    maker: async_sessionmaker[AsyncSession],
    push_settings: Settings,
    pushes: PushService,
    person: Actor,
) -> None:
    name, dead = uuid.uuid4().hex, uuid.uuid4().hex
    pushes.gone.add(dead)
    async with UnitOfWork(maker) as uow:
        for n in (name, dead):
            sub = pushes.subscription(n)
            await service.subscribe(
                uow.session, push_settings, person.user.id, kind="web_push", secret=sub,
                address=sub["endpoint"], label=None, origin=pushes.base,
            )  # fmt: skip
    before = len(pushes.received)
    counts = await service.deliver_pushes(
        maker,
        push_settings,
        [f"{person.user.id}:web_push"],
        {"title": "Decision needed", "body": "Ship it?", "task_id": "t-1"},
    )
    assert counts == {"delivered": 1, "gone": 1}, pushes.refused
    arrived = [r for r in pushes.received[before:] if r[0] == name]
    assert len(arrived) == 1
    _, payload, claims = arrived[0]
    assert payload == {"title": "Decision needed", "body": "Ship it?", "data": {"task_id": "t-1"}}
    assert claims["aud"] == pushes.base and claims["sub"].startswith("mailto:")
    # The gone endpoint is forgotten, the live one kept.
    assert await _subscriptions(maker, person.user.id) == 1


async def test_fcm_gets_a_service_account_token_and_the_message(
    maker: async_sessionmaker[AsyncSession],
    push_settings: Settings,
    pushes: PushService,
    person: Actor,
) -> None:
    token = "device-" + uuid.uuid4().hex * 2
    async with UnitOfWork(maker) as uow:
        for t in (token, "gone-" + uuid.uuid4().hex * 2):
            await service.subscribe(
                uow.session, push_settings, person.user.id, kind="fcm", secret={"token": t},
                address=t, label="android", origin=None,
            )  # fmt: skip
    before = len(pushes.fcm_messages)
    counts = await service.deliver_pushes(
        maker, push_settings, [f"{person.user.id}:fcm"], {"title": "Hi", "body": "there", "n": "1"}
    )
    assert counts == {"delivered": 1, "gone": 1}, pushes.refused
    (message,) = pushes.fcm_messages[before:]
    assert message["path"] == "/v1/projects/demo-project/messages:send"
    assert message["token"] == token
    assert message["notification"] == {"title": "Hi", "body": "there"}
    assert message["data"] == {"n": "1"}
    assert await _subscriptions(maker, person.user.id) == 1


async def test_a_channel_switched_off_sends_nothing(
    maker: async_sessionmaker[AsyncSession],
    push_settings: Settings,
    pushes: PushService,
    person: Actor,
) -> None:
    sub = pushes.subscription(uuid.uuid4().hex)
    async with UnitOfWork(maker) as uow:
        await service.subscribe(
            uow.session, push_settings, person.user.id, kind="web_push", secret=sub,
            address=sub["endpoint"], label=None, origin=None,
        )  # fmt: skip
        await service.set_preferences(
            uow.session, person.user.id, {"task.assigned": {"web_push": False}}
        )
    async with UnitOfWork(maker) as uow:
        notified = await service.notify(
            uow, push_settings, [person.user.id], kind="task.assigned", title="T"
        )
    # In-app still on; the push target list left web_push out.
    assert notified == [person.user.id]
    async with maker() as session:
        prefs = await service.get_preferences(session, person.user.id)
    assert prefs["task.assigned"] == {"in_app": True, "email": True, "web_push": False, "fcm": True}


async def test_the_ssrf_guard_stands_between_a_subscription_and_the_network(
    push_settings: Settings, pushes: PushService
) -> None:
    from backend.push import senders

    sub = pushes.subscription(uuid.uuid4().hex)
    async with guarded_client([]) as strict:
        outcome = await senders.web_push(push_settings, strict, sub, senders.Message("t", "b", {}))
    assert outcome == "failed"


@pytest.fixture
async def committed_client(
    settings: Settings, maker: async_sessionmaker[AsyncSession]
) -> AsyncIterator[httpx.AsyncClient]:
    from backend.main import create_app

    async for c in client_for(create_app(settings), maker):
        yield c


async def test_the_notifications_api(
    committed_client: httpx.AsyncClient,
    maker: async_sessionmaker[AsyncSession],
    settings: Settings,
    person: Actor,
    pushes: PushService,
) -> None:
    c, h = committed_client, person.headers
    sub = pushes.subscription(uuid.uuid4().hex)
    r = await c.post("/api/v1/notifications/push-subscriptions", headers=h, json=sub)
    assert r.status_code == 201, r.text
    assert "endpoint" not in r.json() and r.json()["origin"] == pushes.base
    again = await c.post("/api/v1/notifications/push-subscriptions", headers=h, json=sub)
    assert again.json()["id"] == r.json()["id"]  # one row per device
    bad = {**sub, "keys": {"p256dh": "A" * 30, "auth": sub["keys"]["auth"]}}
    r = await c.post("/api/v1/notifications/push-subscriptions", headers=h, json=bad)
    assert r.status_code == 422 and r.json()["field"] == "keys.p256dh"
    r = await c.post("/api/v1/notifications/devices", headers=h, json={"token": "x" * 40})
    assert r.status_code == 201
    listed = (await c.get("/api/v1/notifications/push-subscriptions", headers=h)).json()
    assert sorted(s["kind"] for s in listed) == ["fcm", "web_push"]
    assert all("token" not in s and "secret_encrypted" not in s for s in listed)
    r = await c.put(
        "/api/v1/notifications/preferences", headers=h, json={"run.failed": {"pager": True}}
    )
    assert r.status_code == 422 and r.json()["field"] == "run.failed.pager"
    r = await c.put(
        "/api/v1/notifications/preferences", headers=h, json={"run.failed": {"email": False}}
    )
    assert r.status_code == 200 and r.json()["run.failed"]["email"] is False
    # Every kind something notifies people of can be switched off (drift's could not).
    from backend.n8n import drift, intake
    from backend.quotas import warnings

    for kind in (drift.KIND, intake.KIND, warnings.KIND):
        r = await c.put(
            "/api/v1/notifications/preferences", headers=h, json={kind: {"web_push": False}}
        )
        assert r.status_code == 200 and r.json()[kind]["web_push"] is False, r.text
    async with UnitOfWork(maker) as uow:
        await service.notify(uow, settings, [person.user.id], kind="invitation", title="Join us")
    page = (await c.get("/api/v1/notifications?unread=true", headers=h)).json()
    assert page["total"] == 1 and page["items"][0]["title"] == "Join us"
    nid = page["items"][0]["id"]
    r = await c.post(f"/api/v1/notifications/{nid}/read", headers=h)
    assert r.status_code == 200 and r.json()["read_at"]
    assert (await c.get("/api/v1/notifications?unread=true", headers=h)).json()["total"] == 0
    r = await c.post(f"/api/v1/notifications/{uuid.uuid4()}/read", headers=h)
    assert r.status_code == 404
    sid = listed[0]["id"]
    assert (
        await c.delete(f"/api/v1/notifications/push-subscriptions/{sid}", headers=h)
    ).status_code == 204
    assert (
        await c.delete(f"/api/v1/notifications/push-subscriptions/{sid}", headers=h)
    ).status_code == 404


async def test_an_invitation_reaches_the_invited_persons_inbox(
    committed_client: httpx.AsyncClient,
    maker: async_sessionmaker[AsyncSession],
    settings: Settings,
    workspace: Workspace,
) -> None:
    from tests.support.identity import make_user, sign_in

    async with UnitOfWork(maker) as uow:
        admin = await member(uow.session, settings, workspace, Role.ADMINISTRATOR)
        invitee = await sign_in(uow.session, settings, await make_user(uow.session))
    r = await committed_client.post(
        f"/api/v1/workspaces/{workspace.id}/invite",
        headers=admin.headers,
        json={"email": invitee.user.email, "role": "editor"},
    )
    assert r.status_code == 201, r.text
    page = (await committed_client.get("/api/v1/notifications", headers=invitee.headers)).json()
    assert [n["kind"] for n in page["items"]] == ["invitation"]
    assert page["items"][0]["data"] == {"workspace_id": str(workspace.id), "role": "editor"}
    # An address with no account yet gets only the e-mail.
    r = await committed_client.post(
        f"/api/v1/workspaces/{workspace.id}/invite",
        headers=admin.headers,
        json={"email": f"nobody-{uuid.uuid4().hex[:6]}@example.com"},
    )
    assert r.status_code == 201
