"""Against a real n8n 2.41.1 (make test-n8n): its answers follow its own shipped spec,
our API connects, tests, syncs, toggles (seen on n8n), and the error path runs end to end:
a failing n8n workflow -> the error workflow we installed -> our intake (a real uvicorn
on loopback) -> a recorded error and a notification, within seconds."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.permissions import Role
from backend.config import Settings
from backend.kit.db import UnitOfWork
from backend.models import N8nError, UserNotification
from backend.n8n import client as n8n
from backend.n8n.api_types import WorkflowCreate
from tests.n8n import spec
from tests.n8n.conftest import n8n_settings
from tests.n8n.real.server import RealN8n
from tests.support.identity import Actor, make_workspace, member
from tests.support.procs import free_port

URL = "/api/v1/n8n/instances"


@pytest.fixture(scope="module")
def studio(settings: Settings) -> Iterator[str]:
    """Our API as a real server on loopback, so n8n's HTTP node can reach the intake."""
    from backend.main import create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(n8n_settings(settings)), host="127.0.0.1", port=port,
                       log_level="warning")
    )  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "studio API did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(15)


@pytest.fixture
async def owner(maker: async_sessionmaker[AsyncSession], settings: Settings) -> Actor:
    async with UnitOfWork(maker) as uow:
        workspace = await make_workspace(uow.session, "n8n fleet")
        actor = await member(uow.session, settings, workspace, Role.OWNER)
    actor.headers["X-Workspace-ID"] = str(workspace.id)
    return actor


def failing_workflow(path: str) -> WorkflowCreate:
    return {
        "name": f"Failing {path}",
        "nodes": [
            {"id": str(uuid.uuid4()), "name": "Webhook", "type": "n8n-nodes-base.webhook",
             "typeVersion": 2, "position": [0, 0], "webhookId": str(uuid.uuid4()),
             "parameters": {"path": path, "httpMethod": "POST", "responseMode": "onReceived"}},
            {"id": str(uuid.uuid4()), "name": "Explode", "type": "n8n-nodes-base.stopAndError",
             "typeVersion": 1, "position": [220, 0],
             "parameters": {"errorMessage": "card declined by the test"}},
        ],
        "connections": {"Webhook": {"main": [[{"node": "Explode", "type": "main", "index": 0}]]}},
        "settings": {"executionOrder": "v1"},
    }  # fmt: skip


async def test_real_answers_follow_the_shipped_spec(real_n8n: RealN8n, settings: Settings) -> None:
    local = n8n_settings(settings)
    async with n8n.client_for(local, real_n8n.base, real_n8n.api_key) as api:
        made = await api.create_workflow(failing_workflow(f"spec-{uuid.uuid4().hex[:6]}"))
        assert spec.check_answer("/workflows", "post", 200, made) == []
    headers = {"X-N8N-API-KEY": real_n8n.api_key}
    async with httpx.AsyncClient(base_url=real_n8n.base + "/api/v1", headers=headers) as raw:
        pairs = (("/workflows", "/workflows"), ("/executions", "/executions"),
                 (f"/workflows/{made['id']}", "/workflows/{workflowId}"))  # fmt: skip
        for path, template in pairs:
            r = await raw.get(path)
            assert r.status_code == 200, r.text
            assert spec.check_answer(template, "get", 200, r.json()) == [], path


async def test_connect_sync_toggle_and_the_error_path_end_to_end(
    real_n8n: RealN8n,
    studio: str,
    owner: Actor,
    settings: Settings,
    maker: async_sessionmaker[AsyncSession],
) -> None:
    local = n8n_settings(settings)
    hook = f"fail-{uuid.uuid4().hex[:8]}"
    async with n8n.client_for(local, real_n8n.base, real_n8n.api_key) as direct:
        failing = await direct.create_workflow(failing_workflow(hook))
    async with httpx.AsyncClient(base_url=studio, headers=owner.headers, timeout=60) as api:
        r = await api.post(URL, json={"name": "real", "base_url": real_n8n.base,
                                      "api_key": real_n8n.api_key})  # fmt: skip
        assert r.status_code == 201, r.text
        iid = r.json()["id"]
        r = await api.post(f"{URL}/{iid}/test")
        assert r.json()["ok"] is True, r.text
        assert r.json()["n8n_version"] == "2.x"
        assert r.json()["capabilities"]["legacy_publish"] is False
        r = await api.post(f"{URL}/{iid}/refresh")
        assert r.json()["ok"] is True, r.text
        r = await api.get(f"{URL}/{iid}/workflows", params={"q": hook})
        [row] = r.json()["items"]
        assert row["n8n_id"] == failing["id"] and row["active"] is False
        # The toggle shows in n8n.
        r = await api.post(f"{URL}/{iid}/workflows/{failing['id']}/toggle", json={"active": True})
        assert r.status_code == 200, r.text
        async with n8n.client_for(local, real_n8n.base, real_n8n.api_key) as direct:
            assert (await direct.workflow(failing["id"]))["active"] is True
        # The error workflow, installed and published, linked to the failing workflow.
        body = {"workflow_ids": [failing["id"]], "intake_base_url": studio}
        r = await api.post(f"{URL}/{iid}/install-error-workflow", json=body)
        assert r.status_code == 200, r.text
        installed = r.json()
        assert installed["active"] is True and installed["linked"] == [failing["id"]]
        r = await api.post(f"{URL}/{iid}/watches", json={})
        assert r.status_code == 201
        # Make it fail; a re-published webhook may answer 404 for a moment.
        started = time.monotonic()
        async with httpx.AsyncClient(base_url=real_n8n.base, timeout=10) as public:
            for _ in range(60):
                fired = await public.post(f"/webhook/{hook}", json={"order": 1})
                if fired.status_code != 404:
                    break
                await asyncio.sleep(0.5)
            assert fired.status_code == 200, fired.text
        error: N8nError | None = None
        while time.monotonic() - started < 60:
            async with maker() as session:
                error = await session.scalar(
                    select(N8nError).where(N8nError.instance_id == uuid.UUID(iid))
                )
            if error is not None:
                break
            await asyncio.sleep(0.3)
        took = time.monotonic() - started
        assert error is not None, (
            f"no error reached the intake:\n{real_n8n.log.read_text()[-3000:]}"
        )
        print(f"[n8n] failure -> intake -> notification in {took:.2f} s")
        assert took < 30
        assert error.workflow_n8n_id == failing["id"] and error.node == "Explode"
        assert "card declined" in error.message
        async with maker() as session:
            notes = (
                await session.scalars(
                    select(UserNotification).where(UserNotification.user_id == owner.user.id)
                )
            ).all()
        assert [n.kind for n in notes] == ["n8n.error"]
        # The next sync sees the failed execution with its message and node.
        r = await api.post(f"{URL}/{iid}/refresh")
        assert r.json()["ok"] is True
        r = await api.get(f"{URL}/{iid}/executions",
                          params={"workflow_id": failing["id"], "status": "error"})  # fmt: skip
        [failed] = r.json()["items"]
        assert failed["n8n_id"] == error.execution_n8n_id
        assert "card declined" in (failed["error_message"] or "")
        assert failed["failed_node"] == "Explode"
        # Off again, and n8n says so.
        r = await api.post(f"{URL}/{iid}/workflows/{failing['id']}/toggle", json={"active": False})
        assert r.json()["active"] is False
        async with n8n.client_for(local, real_n8n.base, real_n8n.api_key) as direct:
            assert (await direct.workflow(failing["id"]))["active"] is False
