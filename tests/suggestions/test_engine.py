"""An accepted suggestion creates a version that runs: a workflow whose fetch fails on a
flaky local service with no retries, run by the real engine until its history shows it;
the suggestion is accepted over HTTP; the new version, run by the engine, retries and
completes. Both the recompute and the accept are announced on the workspace channel the
`workflows` socket channel is built from. Committed data throughout (the runner and the
API use their own transactions)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.permissions import Role
from backend.config import Settings
from backend.kit.db import UnitOfWork
from backend.kit.http_guard import guarded_client
from backend.main import create_app
from backend.models import Workspace
from backend.realtime.events import workspace_channel
from tests.support.asgi import client_for
from tests.support.engine import Enqueued, loopback_settings, state
from tests.support.factories import WorkflowExecutionFactory, create
from tests.support.identity import member
from tests.support.target import Target, http_target
from workers.engine.runner import Runner


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    with http_target() as t:
        yield t


def engine_settings(settings: Settings) -> Settings:
    local = loopback_settings(settings)
    # The proposed policy's first wait (5 s) happens in place, so one execute() call
    # runs the retry instead of parking the run.
    return local.model_copy(
        update={"engine": local.engine.model_copy(update={"inline_retry_max_s": 5})}
    )


@pytest.fixture
async def runner(
    settings: Settings, maker: async_sessionmaker[AsyncSession]
) -> AsyncIterator[Runner]:
    async with guarded_client(["127.0.0.1/32"]) as http:
        yield Runner(
            engine_settings(settings), maker, http, f"sug-{uuid.uuid4().hex[:6]}", Enqueued()
        )


async def run(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    workflow_id: str,
    version: int,
) -> tuple[str, dict[str, Any]]:
    async with UnitOfWork(maker) as uow:
        ex = await create(
            uow.session, WorkflowExecutionFactory, workspace_id=workspace.id,
            workflow_id=uuid.UUID(workflow_id), version=version,
        )  # fmt: skip
    status = await runner.execute(ex.id)
    _, nodes = await state(maker, ex.id)
    return status, {k: (v.status, v.attempt, v.error) for k, v in nodes.items()}


async def notices(redis: Redis, channel: str, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """The first notice of each wanted type, waiting up to 10 s."""
    found: dict[str, dict[str, Any]] = {}
    pubsub = redis.pubsub()
    await pubsub.subscribe(channel)
    try:
        async with asyncio.timeout(10):
            while not wanted <= found.keys():
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:
                    body = json.loads(message["data"])
                    found.setdefault(body["type"], body)
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    return found


async def test_an_accepted_suggestion_creates_a_version_that_runs(
    settings: Settings,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    runner: Runner,
    target: Target,
) -> None:
    async with UnitOfWork(maker) as uow:
        editor = await member(uow.session, settings, workspace, Role.EDITOR)
    headers = {**editor.headers, "X-Workspace-ID": str(workspace.id)}
    # Fails (503) the first 4 times it is called, then answers.
    path = f"flaky/{uuid.uuid4().hex[:8]}/4"
    definition = {
        "nodes": [
            {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
            {"id": "fetch", "type": "action", "retry": {"max_retries": 0},
             "config": {"kind": "http_request", "url": f"{target.base}/{path}"}},
        ],
        "connections": [{"source": "start", "target": "fetch"}],
    }  # fmt: skip
    redis = Redis.from_url(settings.redis_url)
    channel = workspace_channel(workspace.id)
    async for client in client_for(create_app(engine_settings(settings)), maker):
        r = await client.post(
            "/api/v1/workflows", headers=headers, json={"name": "Flaky", **definition}
        )
        assert r.status_code == 201, r.text
        wf_id = r.json()["id"]
        for _ in range(3):
            status, nodes = await run(runner, maker, workspace, wf_id, 1)
            assert status == "failed"
            assert nodes["fetch"][0] == "failed" and nodes["fetch"][2]["class"] == "server_error"

        listening = asyncio.create_task(
            notices(redis, channel, {"workflow.suggestions", "workflow.suggestion.accept"})
        )
        await asyncio.sleep(0.2)  # subscribed before anything is published
        url = f"/api/v1/workflows/{wf_id}/suggestions"
        refreshed = await client.post(f"{url}/refresh", headers=headers)
        assert refreshed.status_code == 200, refreshed.text
        [suggestion] = refreshed.json()["items"]
        assert suggestion["kind"] == "missing_retry"
        assert suggestion["evidence"]["transient_failures"] == {"server_error": 3}
        accepted = await client.post(f"{url}/{suggestion['id']}/accept", headers=headers)
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["workflow"]["version"] == 2
        heard = await listening

    # Version 2 retries the 503 (5 s later) and completes.
    status, nodes = await run(runner, maker, workspace, wf_id, 2)
    assert status == "completed", nodes
    assert nodes["fetch"][:2] == ("completed", 2)
    assert target.hits[path] == 5
    assert heard["workflow.suggestions"]["resource_id"] == wf_id
    assert heard["workflow.suggestions"]["data"]["added"] == [suggestion["id"]]
    assert heard["workflow.suggestion.accept"]["data"]["version"] == 2
    await redis.aclose()
