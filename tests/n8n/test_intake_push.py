"""A failure n8n reports reaches a watcher's browser as a Web Push (issue 17 with 16's
push): the intake on a real uvicorn notifies through backend.push, the session's real
worker signs and encrypts the push, and the loopback push service decrypts it; the
watcher's inbox has it too, and a watcher who switched `n8n.error` web pushes off gets
the inbox row and no push."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.n8n.standin import StandIn, running
from tests.push.loopback import PushService, push_service, vapid_keys

# The worker is started after collection with this environment: it signs Web Push with
# this VAPID key (or with the one another module set first).
_PRIVATE, _PUBLIC = vapid_keys()
os.environ.setdefault("PUSH__VAPID_PRIVATE_KEY", _PRIVATE)
os.environ.setdefault("PUSH__VAPID_PUBLIC_KEY", _PUBLIC)

pytestmark = [pytest.mark.xdist_group("crossprocess"), pytest.mark.usefixtures("worker_name")]


@pytest.fixture
def api(uvicorn_api: str) -> str:
    """The real uvicorn (this package's own `api` is an in-process client)."""
    return uvicorn_api


@pytest.fixture(scope="module")
def pushes() -> Iterator[PushService]:
    with push_service() as s:
        yield s


@pytest.fixture(scope="module")
def n8n_standin() -> Iterator[StandIn]:
    with running() as s:
        yield s


def poll(check: Any, timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_an_n8n_failure_reaches_a_watchers_browser_as_a_web_push(
    api: str,
    owner: dict[str, str],
    pushes: PushService,
    n8n_standin: StandIn,
) -> None:
    browser = f"n8n-{uuid.uuid4().hex[:6]}"
    r = httpx.post(f"{api}/api/v1/notifications/push-subscriptions", headers=owner,
                   json=pushes.subscription(browser), timeout=10)  # fmt: skip
    assert r.status_code == 201, r.text
    wf = n8n_standin.add_workflow("Payments")
    r = httpx.post(
        f"{api}/api/v1/n8n/instances", headers=owner, timeout=10,
        json={"name": f"n8n-{uuid.uuid4().hex[:6]}", "base_url": n8n_standin.base,
              "api_key": n8n_standin.api_key},
    )  # fmt: skip
    assert r.status_code == 201, r.text
    made = r.json()
    r = httpx.post(f"{api}/api/v1/n8n/instances/{made['id']}/watches", headers=owner, json={},
                   timeout=10)  # fmt: skip
    assert r.status_code == 201, r.text
    payload, _ = n8n_standin.fail(wf["id"], "Card declined", "Charge")
    r = httpx.post(made["intake_url"], json=payload, timeout=10)
    assert r.status_code == 202, r.text
    poll(lambda: any(name == browser for name, _, _ in pushes.received))
    (push,) = [p for name, p, _ in pushes.received if name == browser]
    assert push["title"] == "n8n: Payments failed on " + made["name"]
    assert "Card declined" in push["body"]
    assert push["data"]["kind"] == "n8n.error" and push["data"]["instance_id"] == made["id"]
    notes = httpx.get(f"{api}/api/v1/notifications", headers=owner, timeout=10).json()
    assert [n["kind"] for n in notes["items"] if n["data"].get("instance_id") == made["id"]] == [
        "n8n.error"
    ]
    # Web pushes of n8n.error switched off: the next failure is in the inbox only.
    r = httpx.put(f"{api}/api/v1/notifications/preferences", headers=owner, timeout=10,
                  json={"n8n.error": {"web_push": False}})  # fmt: skip
    assert r.status_code == 200 and r.json()["n8n.error"]["web_push"] is False
    payload, _ = n8n_standin.fail(wf["id"], "Disk full", "Write")
    r = httpx.post(made["intake_url"], json=payload, timeout=10)
    assert r.status_code == 202, r.text
    poll(
        lambda: len(
            [n for n in httpx.get(f"{api}/api/v1/notifications", headers=owner,
                                  timeout=10).json()["items"]
             if n["data"].get("instance_id") == made["id"]]
        ) == 2
    )  # fmt: skip
    time.sleep(1.5)  # room for a push that should not come
    assert len([1 for name, _, _ in pushes.received if name == browser]) == 1
    r = httpx.put(f"{api}/api/v1/notifications/preferences", headers=owner, timeout=10,
                  json={"n8n.error": {"web_push": True}})  # fmt: skip
    assert r.status_code == 200
