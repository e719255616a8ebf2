"""Triggers and notifications through the API and a real Celery worker: a webhook that
waits for its run's output, an event trigger chaining two workflows, and a failure
notification reaching a real SMTP server and a local webhook receiver, signed."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.kit import signing
from backend.models import Workspace
from tests.support.asgi import client_for
from tests.support.mail import Mailbox, body_of
from tests.support.target import http_target
from tests.support.triggers import Receiver, committed_owner

pytestmark = [pytest.mark.xdist_group("crossprocess"), pytest.mark.usefixtures("worker_name")]

Committed = tuple[async_sessionmaker[AsyncSession], Callable[[], Awaitable[Workspace]]]


@pytest.fixture
async def live(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app on its own engine: requests commit for real, so the worker sees them."""
    async for c in client_for(app):
        yield c


async def create(client: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any]) -> str:
    r = await client.post(
        "/api/v1/workflows", headers=headers, json={"name": f"t {uuid.uuid4().hex[:6]}", **body}
    )
    assert r.status_code == 201, r.text
    workflow_id = str(r.json()["id"])
    r = await client.patch(
        f"/api/v1/workflows/{workflow_id}/status", headers=headers, json={"status": "published"}
    )
    assert r.status_code == 200, r.text
    return workflow_id


async def finished(
    client: httpx.AsyncClient, headers: dict[str, str], workflow_id: str, timeout_s: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = await client.get(
            "/api/v1/executions", headers=headers, params={"workflow_id": workflow_id}
        )
        items = r.json()["items"]
        if items and items[0]["status"] in ("completed", "failed", "cancelled"):
            return dict(items[0])
        await asyncio.sleep(0.1)
    raise AssertionError(f"no finished run of {workflow_id} within {timeout_s} s")


async def test_a_webhook_with_wait_answers_the_runs_output(
    live: httpx.AsyncClient, committed: Committed, settings: Settings
) -> None:
    maker, new_workspace = committed
    owner = await committed_owner(maker, settings, await new_workspace())
    wf = await create(live, owner, {
        "nodes": [
            {"id": "hook", "type": "trigger", "config": {"kind": "webhook"}},
            {"id": "double", "type": "logic",
             "config": {"kind": "transform", "template": '{"doubled": {{ trigger.x * 2 }}}'}},
        ],
        "connections": [{"source": "hook", "target": "double"}],
    })  # fmt: skip
    triggers = (await live.get(f"/api/v1/workflows/{wf}/triggers", headers=owner)).json()
    url = triggers[0]["webhook_url"].split("://", 1)[1].split("/", 1)[1]
    r = await live.post(f"/{url}", params={"wait": 20}, json={"x": 21})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "completed"
    assert r.json()["output"] == {"double": {"doubled": 42}}
    # Without wait: 202 and the id to follow.
    r = await live.post(f"/{url}", json={"x": 1})
    assert r.status_code == 202 and r.json()["links"]["execution"].endswith(
        r.json()["execution_id"]
    )


async def test_an_event_trigger_chains_two_workflows(
    live: httpx.AsyncClient, committed: Committed, settings: Settings
) -> None:
    maker, new_workspace = committed
    owner = await committed_owner(maker, settings, await new_workspace())
    first = await create(live, owner, {
        "nodes": [
            {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
            {"id": "make", "type": "logic",
             "config": {"kind": "transform", "template": '{"n": {{ trigger.n + 1 }}}'}},
        ],
        "connections": [{"source": "start", "target": "make"}],
    })  # fmt: skip
    second = await create(live, owner, {
        "nodes": [
            {"id": "after", "type": "trigger",
             "config": {"kind": "event", "workflow_id": first, "on": ["completed"]}},
            {"id": "use", "type": "logic",
             "config": {"kind": "transform",
                        "template": '{"got": {{ trigger.output.make.n }}}'}},
        ],
        "connections": [{"source": "after", "target": "use"}],
    })  # fmt: skip
    r = await live.post(
        "/api/v1/executions", headers=owner, json={"workflow_id": first, "trigger_data": {"n": 1}}
    )
    assert r.status_code == 202, r.text
    source = r.json()["id"]
    run = await finished(live, owner, second)
    assert run["status"] == "completed", run
    assert run["trigger_type"] == "event"
    assert run["trigger_data"]["execution_id"] == source
    assert run["output"] == {"use": {"got": 2}}


async def test_a_failure_notification_reaches_smtp_and_a_signed_webhook(
    live: httpx.AsyncClient,
    committed: Committed,
    settings: Settings,
    mailbox: Mailbox,
    receiver: Receiver,
) -> None:
    maker, new_workspace = committed
    owner = await committed_owner(maker, settings, await new_workspace())
    address = f"ops-{uuid.uuid4().hex[:8]}@example.com"
    with http_target() as target:
        wf = await create(live, owner, {
            "nodes": [
                {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
                {"id": "call", "type": "action", "retry": {"max_retries": 0},
                 "config": {"kind": "http_request", "url": f"{target.base}/status/404"}},
            ],
            "connections": [{"source": "start", "target": "call"}],
            "settings": {"notifications": {"on": ["failed"], "emails": [address],
                                           "webhooks": [{"url": f"{receiver.url}/alerts"}]}},
        })  # fmt: skip
        r = await live.post(f"/api/v1/workflows/{wf}/notifications/secret", headers=owner)
        assert r.status_code == 201, r.text
        secret = r.json()["secret"]
        before = mailbox.count()
        r = await live.post("/api/v1/executions", headers=owner, json={"workflow_id": wf})
        assert r.status_code == 202, r.text
        execution_id = r.json()["id"]
        assert (await finished(live, owner, wf))["status"] == "failed"
    mail = await asyncio.to_thread(mailbox.wait_for, address, after=before)
    assert execution_id in body_of(mail) and "failed" in mail["Subject"]
    hits = await asyncio.to_thread(receiver.wait_for, 1)
    hit = hits[0]
    assert hit.path == "/alerts"
    # A valid Standard Webhooks signature under the workflow's notification secret.
    signing.verify(secret, hit.headers, hit.body)
    assert f'"id":"{execution_id}"' in hit.body.decode()
    deadline = time.monotonic() + 10
    while True:
        rows = (await live.get(f"/api/v1/workflows/{wf}/notifications", headers=owner)).json()
        if {(n["channel"], n["status"]) for n in rows["items"]} == {
            ("email", "sent"),
            ("webhook", "sent"),
        }:
            break
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.1)
    assert all(n["attempts"] == 1 and n["last_error"] is None for n in rows["items"])


async def test_notification_webhooks_are_retried_with_backoff_and_a_4xx_is_final(
    live: httpx.AsyncClient, committed: Committed, settings: Settings
) -> None:
    maker, new_workspace = committed
    owner = await committed_owner(maker, settings, await new_workspace())
    key = uuid.uuid4().hex[:8]
    with http_target() as target:
        flaky, gone = f"{target.base}/flaky/{key}/1", f"{target.base}/status/404"
        wf = await create(live, owner, {
            "nodes": [
                {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
                {"id": "shape", "type": "logic", "config": {"kind": "transform", "template": "1"}},
            ],
            "connections": [{"source": "start", "target": "shape"}],
            "settings": {"notifications": {"on": ["completed"],
                                           "webhooks": [{"url": flaky}, {"url": gone}]}},
        })  # fmt: skip
        r = await live.post("/api/v1/executions", headers=owner, json={"workflow_id": wf})
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 45
        while True:
            rows = (await live.get(f"/api/v1/workflows/{wf}/notifications", headers=owner)).json()
            by_target = {n["target"]: n for n in rows["items"]}
            if {n["status"] for n in by_target.values()} == {"sent", "failed"}:
                break
            assert time.monotonic() < deadline, rows
            await asyncio.sleep(0.25)
        # 503 first, then the retry (after the backoff) got through.
        assert by_target[flaky]["status"] == "sent" and by_target[flaky]["attempts"] == 2
        assert target.hits[f"flaky/{key}/1"] == 2
        # A 404 will not change: one attempt, recorded, not retried.
        assert by_target[gone]["status"] == "failed" and by_target[gone]["attempts"] == 1
        assert "HTTP 404" in by_target[gone]["last_error"]
