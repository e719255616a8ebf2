"""The `n8n` action node against the stand-in (with production webhooks): a run on the
session's real Celery worker calls an n8n workflow's webhook and retries an execution;
saving checks the instance is the workspace's own (422 naming the field); the runner
refuses another workspace's instance, an inactive workflow, a webhook n8n does not
know, and does not call a webhook twice after a 500."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.kit.db import UnitOfWork
from backend.kit.http_guard import guarded_client
from backend.models import N8nInstance, Workspace
from backend.n8n.service import Secrets, seal
from tests.n8n.conftest import n8n_settings
from tests.n8n.webhooks import HookedStandIn, running_hooked
from tests.support.crossprocess import wait_until_done, workflow
from tests.support.engine import Enqueued, start, state
from tests.support.factories import WorkspaceFactory, create
from workers.engine.runner import Runner


@pytest.fixture
def api(uvicorn_api: str) -> str:
    """The real uvicorn (this package's own `api` is an in-process client)."""
    return uvicorn_api


@pytest.fixture(scope="module")
def hooked_server() -> Iterator[HookedStandIn]:
    with running_hooked() as s:
        yield s


@pytest.fixture
def hooked(hooked_server: HookedStandIn) -> Iterator[HookedStandIn]:
    hooked_server.reset()
    yield hooked_server
    assert hooked_server.violations == []


def n8n_node(node_id: str, instance_id: str, **config: Any) -> dict[str, Any]:
    return {"id": node_id, "type": "action",
            "config": {"kind": "n8n", "instance_id": instance_id, **config}}  # fmt: skip


def graph(*nodes: dict[str, Any]) -> dict[str, Any]:
    chain = [{"id": "start", "type": "trigger", "config": {"kind": "manual"}}, *nodes]
    return {
        "nodes": chain,
        "connections": [
            {"source": a["id"], "target": b["id"]} for a, b in itertools.pairwise(chain)
        ],
    }


# Through the real worker ----------------------------------------------------------------


@pytest.mark.xdist_group("crossprocess")
@pytest.mark.usefixtures("worker_name")
def test_a_run_calls_the_n8n_webhook_and_retries_an_execution(
    api: str,
    owner: dict[str, str],
    hooked: HookedStandIn,
) -> None:
    leads = hooked.webhook_workflow("Leads", "new-lead", "POST")
    failed = hooked.add_execution(leads["id"], "error", error="boom", node="Step 1")
    r = httpx.post(
        f"{api}/api/v1/n8n/instances", headers=owner, timeout=10,
        json={"name": f"n8n-{uuid.uuid4().hex[:6]}", "base_url": hooked.base,
              "api_key": hooked.api_key},
    )  # fmt: skip
    assert r.status_code == 201, r.text
    iid = r.json()["id"]
    definition = graph(
        n8n_node(
            "call", iid, n8n_workflow_id=leads["id"],
            headers={"X-Source": "studio {{ trigger.team }}"},
            query={"ref": "{{ trigger.ref }}"},
            body={"lead": "{{ trigger.name }}", "score": "{{ trigger.score }}"},
        ),
        n8n_node("again", iid, operation="retry_execution",
                 execution_id="{{ trigger.failed }}", load_workflow=True),
    )  # fmt: skip
    wid = workflow(api, owner, definition)
    trigger = {"name": "Ada", "score": 7, "team": "eu", "ref": "x1", "failed": failed["id"]}
    r = httpx.post(
        f"{api}/api/v1/executions",
        headers=owner,
        timeout=10,
        json={"workflow_id": wid, "trigger_data": trigger},
    )
    assert r.status_code == 202, r.text
    run = wait_until_done(api, owner, r.json()["id"], timeout_s=60)
    assert run["status"] == "completed", run
    nodes = httpx.get(
        f"{api}/api/v1/executions/{run['id']}/nodes", headers=owner, timeout=10
    ).json()
    by_id = {n["node_id"]: n for n in nodes}
    call = by_id["call"]["output"]
    assert call["status"] == 200 and call["method"] == "POST" and call["webhook_node"] == "Webhook"
    assert json.loads(call["body"]["received"]) == {"lead": "Ada", "score": 7}
    (hook,) = hooked.hooks
    assert (hook.method, hook.path, hook.query) == ("POST", "new-lead", {"ref": "x1"})
    assert hook.headers["x-source"] == "studio eu"
    assert hook.headers["idempotency-key"].startswith(run["id"])
    # The API key went to the API only, never to the webhook.
    assert "x-n8n-api-key" not in hook.headers
    again = by_id["again"]["output"]
    assert again["retry_of"] == failed["id"] and again["execution"]["retryOf"] == failed["id"]
    retried = [c for c in hooked.calls if c.path.endswith("/retry")]
    assert len(retried) == 1 and retried[0].body == {"loadWorkflow": True}
    # While a published workflow calls the instance, it cannot be deleted.
    r = httpx.patch(f"{api}/api/v1/workflows/{wid}/status", headers=owner, timeout=10,
                    json={"status": "published"})  # fmt: skip
    assert r.status_code == 200, r.text
    r = httpx.delete(f"{api}/api/v1/n8n/instances/{iid}", headers=owner, timeout=10)
    assert r.status_code == 409 and "published workflows call" in r.json()["detail"], r.text


@pytest.mark.xdist_group("crossprocess")
def test_saving_refuses_an_instance_that_is_not_the_workspaces(
    api: str,
    owner: dict[str, str],
    hooked: HookedStandIn,
) -> None:
    def save(definition: dict[str, Any]) -> httpx.Response:
        return httpx.post(
            f"{api}/api/v1/workflows", headers=owner, timeout=10,
            json={"name": f"n {uuid.uuid4().hex[:6]}", **definition},
        )  # fmt: skip

    r = save(graph(n8n_node("call", str(uuid.uuid4()), n8n_workflow_id="wf1")))
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "nodes.call.config.instance_id"
    assert "not found in this workspace" in r.json()["detail"]
    r = save(graph(n8n_node("call", str(uuid.uuid4()))))
    assert r.status_code == 422 and r.json()["field"] == "nodes.call.config.n8n_workflow_id"
    r = save(graph(n8n_node("call", str(uuid.uuid4()), operation="retry_execution")))
    assert r.status_code == 422 and r.json()["field"] == "nodes.call.config.execution_id"
    r = save(graph(n8n_node("call", str(uuid.uuid4()), n8n_workflow_id="../../x")))
    assert r.status_code == 422 and r.json()["field"] == "nodes.call.config.n8n_workflow_id"
    assert hooked.hooks == []


# The runner, directly -------------------------------------------------------------------


@pytest.fixture
async def runner(
    settings: Settings, maker: async_sessionmaker[AsyncSession]
) -> AsyncIterator[Runner]:
    local = n8n_settings(settings)
    async with guarded_client(["127.0.0.1/32"]) as http:
        yield Runner(local, maker, http, f"test-{uuid.uuid4().hex[:6]}", Enqueued())


async def instance_in(
    maker: async_sessionmaker[AsyncSession], settings: Settings, ws: Workspace, base: str, key: str
) -> uuid.UUID:
    async with UnitOfWork(maker) as uow:
        row = N8nInstance(
            id=uuid.uuid4(), workspace_id=ws.id, name=f"n8n-{uuid.uuid4().hex[:6]}",
            base_url=base, environment="production", tags=[], enabled=True, status="ok",
            capabilities={}, notify={},
        )  # fmt: skip
        seal(settings, row, Secrets(key, f"n8n_{uuid.uuid4().hex}", "whsec_x"))
        uow.session.add(row)
        return row.id


async def run_one(
    runner: Runner, maker: async_sessionmaker[AsyncSession], ws: Workspace, node: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    eid = await start(maker, ws, graph(node))
    await runner.execute(eid)
    ex, rows = await state(maker, eid)
    assert "call" in rows, ex.error
    return ex.status, {"status": rows["call"].status, "output": rows["call"].output,
                       "error": rows["call"].error}  # fmt: skip


async def test_another_workspaces_instance_is_refused_at_run_time(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    settings: Settings,
    workspace: Workspace,
    hooked: HookedStandIn,
) -> None:
    leads = hooked.webhook_workflow("Leads", "lead")
    async with UnitOfWork(maker) as uow:
        other = await create(uow.session, WorkspaceFactory)
    theirs = await instance_in(maker, settings, other, hooked.base, hooked.api_key)
    # A definition that names it (written to the database by hand) fails before any
    # node runs: the pinned version is checked against the run's workspace again.
    eid = await start(maker, workspace, graph(n8n_node("call", str(theirs),
                                                       n8n_workflow_id=leads["id"])))  # fmt: skip
    await runner.execute(eid)
    ex, rows = await state(maker, eid)
    assert ex.status == "failed" and rows == {}
    assert ex.error is not None and ex.error["problems"] == [
        {"field": "config.instance_id", "message": "n8n instance not found in this workspace",
         "node_id": "call"}
    ]  # fmt: skip
    assert hooked.calls == [] and hooked.hooks == []


async def test_inactive_unknown_and_failing_webhooks_fail_clearly_and_are_not_repeated(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    settings: Settings,
    workspace: Workspace,
    hooked: HookedStandIn,
) -> None:
    iid = str(await instance_in(maker, settings, workspace, hooked.base, hooked.api_key))
    draft = hooked.webhook_workflow("Draft", "draft", active=False)
    status, node = await run_one(
        runner, maker, workspace, n8n_node("call", iid, n8n_workflow_id=draft["id"])
    )
    assert status == "failed" and "is not active" in node["error"]["message"]
    assert hooked.hooks == []
    # The method the node asks for is not the Webhook node's: n8n's 404, said plainly.
    live = hooked.webhook_workflow("Live", "live", "POST")
    status, node = await run_one(
        runner, maker, workspace, n8n_node("call", iid, n8n_workflow_id=live["id"], method="PUT")
    )
    assert status == "failed" and "answered 404" in node["error"]["message"]
    assert node["error"]["message"].count("published") == 1
    # A 500 after the body was sent: the n8n workflow may have run; not sent again.
    hooked.hooks.clear()
    hooked.hook_faults.append(500)
    status, node = await run_one(
        runner, maker, workspace, n8n_node("call", iid, n8n_workflow_id=live["id"], body="{}")
    )
    assert status == "failed" and "answered 500" in node["error"]["message"]
    assert len(hooked.hooks) == 1
    # Unknown workflow and no webhook path of that name.
    status, node = await run_one(
        runner, maker, workspace, n8n_node("call", iid, n8n_workflow_id="wf404")
    )
    assert status == "failed" and node["error"]["message"].startswith("n8n:")
    status, node = await run_one(
        runner, maker, workspace,
        n8n_node("call", iid, n8n_workflow_id=live["id"], webhook_path="other"),
    )  # fmt: skip
    assert status == "failed" and "no Webhook node on path 'other'" in node["error"]["message"]


async def test_an_instance_on_a_private_address_needs_the_operators_allowance(
    settings: Settings,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    hooked: HookedStandIn,
) -> None:
    leads = hooked.webhook_workflow("Leads", "lead")
    iid = str(await instance_in(maker, settings, workspace, hooked.base, hooked.api_key))
    async with guarded_client([]) as http:
        strict = Runner(settings, maker, http, f"test-{uuid.uuid4().hex[:6]}", Enqueued())
        status, node = await run_one(
            strict, maker, workspace, n8n_node("call", iid, n8n_workflow_id=leads["id"])
        )
    assert status == "failed"
    assert "HTTP__ALLOW_PRIVATE_NETWORKS" in error_of_node(node)
    assert hooked.calls == [] and hooked.hooks == []


def error_of_node(node: dict[str, Any]) -> str:
    assert node["error"] is not None
    return str(node["error"]["message"])
