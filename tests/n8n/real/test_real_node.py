"""The `n8n` action node against a real n8n 2.41.1 (make test-n8n): a run of ours calls a
published n8n workflow's production webhook (n8n answers with what it received: the
body, our headers, and no API key) and retries a failed n8n execution."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.kit.db import UnitOfWork
from backend.kit.http_guard import guarded_client
from backend.models import N8nInstance, Workspace
from backend.n8n import client as n8n
from backend.n8n.api_types import WorkflowCreate
from backend.n8n.service import Secrets, seal
from tests.n8n.conftest import n8n_settings
from tests.n8n.real.server import RealN8n
from tests.n8n.real.test_real_n8n import failing_workflow
from tests.support.engine import Enqueued, start, state
from workers.engine.runner import Runner


def echo_workflow(path: str) -> WorkflowCreate:
    """A Webhook node answering with the item it made (body, headers, query)."""
    return {
        "name": f"Echo {path}",
        "nodes": [
            {"id": str(uuid.uuid4()), "name": "Hook", "type": "n8n-nodes-base.webhook",
             "typeVersion": 2, "position": [0, 0], "webhookId": str(uuid.uuid4()),
             "parameters": {"path": path, "httpMethod": "POST", "responseMode": "lastNode"}},
        ],
        "connections": {},
        "settings": {"executionOrder": "v1"},
    }  # fmt: skip


@pytest.fixture
async def runner(
    settings: Settings, maker: async_sessionmaker[AsyncSession]
) -> AsyncIterator[Runner]:
    async with guarded_client(["127.0.0.1/32"]) as http:
        yield Runner(n8n_settings(settings), maker, http, f"t-{uuid.uuid4().hex[:6]}", Enqueued())


async def _until_registered(base: str, path: str) -> None:
    # A just-published webhook may answer 404 for a moment.
    async with httpx.AsyncClient(base_url=base, timeout=10) as public:
        for _ in range(60):
            r = await public.post(f"/webhook/{path}", json={"warm": True})
            if r.status_code != 404:
                return
            await asyncio.sleep(0.5)
    raise AssertionError(f"webhook {path} never registered")


async def test_our_node_calls_a_real_webhook_and_retries_a_real_execution(
    real_n8n: RealN8n,
    runner: Runner,
    settings: Settings,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
) -> None:
    local = n8n_settings(settings)
    echo_path, fail_path = f"echo-{uuid.uuid4().hex[:8]}", f"fail-{uuid.uuid4().hex[:8]}"
    async with n8n.client_for(local, real_n8n.base, real_n8n.api_key) as api:
        echo = await api.create_workflow(echo_workflow(echo_path))
        await api.publish(echo["id"])
        failing = await api.create_workflow(failing_workflow(fail_path))
        await api.publish(failing["id"])
    await _until_registered(real_n8n.base, echo_path)
    await _until_registered(real_n8n.base, fail_path)
    failed_id: str | None = None
    async with n8n.client_for(local, real_n8n.base, real_n8n.api_key) as api:
        for _ in range(60):
            async for page in api.executions(status="error", workflow_id=failing["id"]):
                failed_id = str(page[0]["id"]) if page else None
                break
            if failed_id:
                break
            await asyncio.sleep(0.5)
    assert failed_id, "the failing workflow left no failed execution"

    async with UnitOfWork(maker) as uow:
        row = N8nInstance(
            id=uuid.uuid4(), workspace_id=workspace.id, name=f"real-{uuid.uuid4().hex[:6]}",
            base_url=real_n8n.base, environment="production", tags=[], enabled=True,
            status="ok", capabilities={}, notify={},
        )  # fmt: skip
        seal(settings, row, Secrets(real_n8n.api_key, f"n8n_{uuid.uuid4().hex}", "whsec_x"))
        uow.session.add(row)
    iid = str(row.id)
    definition: dict[str, Any] = {
        "nodes": [
            {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
            {"id": "call", "type": "action",
             "config": {"kind": "n8n", "instance_id": iid, "n8n_workflow_id": echo["id"],
                        "headers": {"X-Order": "{{ trigger.order }}"},
                        "body": {"order": "{{ trigger.order }}", "who": "studio"}}},
            {"id": "again", "type": "action",
             "config": {"kind": "n8n", "instance_id": iid, "operation": "retry_execution",
                        "execution_id": failed_id}},
        ],
        "connections": [{"source": "start", "target": "call"},
                        {"source": "call", "target": "again"}],
    }  # fmt: skip
    eid = await start(maker, workspace, definition, {"order": 42})
    await runner.execute(eid)
    ex, rows = await state(maker, eid)
    call = rows["call"]
    assert call.status == "completed", call.error
    answer = call.output["body"]
    item = answer[0] if isinstance(answer, list) else answer
    assert item["body"] == {"order": 42, "who": "studio"}
    assert item["headers"]["x-order"] == "42"
    assert "x-n8n-api-key" not in item["headers"]
    assert item["headers"]["idempotency-key"].startswith(str(eid))
    # The retry is n8n's own: a new execution that says which one it retried. The
    # workflow still fails, so the node reports n8n's answer, not our guess.
    again = rows["again"]
    assert again.status == "completed", again.error
    assert again.output["retry_of"] == failed_id
    assert str(again.output["execution"]["retryOf"]) == failed_id
    assert ex.status == "completed", ex.error
