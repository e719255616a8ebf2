"""`POST /executions` writes the run's activity entry in its admission statement
(backend/executions/admission.py, issue 20): the same entry `record` wrote through the
ORM, the same live-feed notice after the commit, nothing for a replayed key."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from backend.auth.permissions import Role
from backend.config import Settings
from backend.kit.db import UnitOfWork
from backend.models import ActivityLog, Workspace
from backend.realtime.events import workspace_channel
from tests.support.asgi import client_for
from tests.support.identity import member

DEFINITION = {
    "name": "Admitted",
    "nodes": [
        {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
        {"id": "t", "type": "logic", "config": {"kind": "transform", "template": "{{ 1 }}"}},
    ],
    "connections": [{"source": "start", "target": "t"}],
}


async def _starts(redis: Redis, channel: str, count: int, wait_s: float) -> list[dict[str, Any]]:
    """The `execution.start` notices heard on the workspace's channel within wait_s."""
    heard: list[dict[str, Any]] = []
    pubsub = redis.pubsub()
    await pubsub.subscribe(channel)
    try:
        async with asyncio.timeout(wait_s):
            while len(heard) < count + 1:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                if message is not None:
                    body = json.loads(message["data"])
                    if body["type"] == "execution.start":
                        heard.append(body)
    except TimeoutError:
        pass
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    return heard


async def test_a_start_writes_its_activity_entry_with_the_run(
    app: FastAPI,
    settings: Settings,
    maker: async_sessionmaker[AsyncSession],
    engine: AsyncEngine,
    workspace: Workspace,
) -> None:
    async with UnitOfWork(maker) as uow:
        editor = await member(uow.session, settings, workspace, Role.EDITOR)
    headers = {**editor.headers, "X-Workspace-ID": str(workspace.id), "User-Agent": "h25/1"}
    redis = Redis.from_url(settings.redis_url)
    statements: list[str] = []

    def seen(*args: Any) -> None:
        statements.append(str(args[2]))

    try:
        async for client in client_for(app, maker):
            r = await client.post("/api/v1/workflows", headers=headers, json=DEFINITION)
            assert r.status_code == 201, r.text
            workflow = r.json()
            listening = asyncio.create_task(_starts(redis, workspace_channel(workspace.id), 1, 3.0))
            await asyncio.sleep(0.2)  # subscribed before anything is published
            event.listen(engine.sync_engine, "before_cursor_execute", seen)
            try:
                body = {"workflow_id": workflow["id"]}
                key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
                first = await client.post(
                    "/api/v1/executions", headers={**headers, **key}, json=body
                )
                again = await client.post(
                    "/api/v1/executions", headers={**headers, **key}, json=body
                )
            finally:
                event.remove(engine.sync_engine, "before_cursor_execute", seen)
            heard = await listening
    finally:
        await redis.aclose()
    assert first.status_code == 202, first.text
    assert again.status_code == 200, again.text
    run_id = first.json()["id"]
    assert again.json()["id"] == run_id
    # Each request sent one admission statement (run, history and entry; the replay's
    # ON CONFLICT wrote none of them) and no INSERT of its own for the entry (the ORM
    # flush at the commit).
    inserts = [s for s in statements if "INSERT" in s]
    assert len(inserts) == 2, inserts
    for insert in inserts:
        assert insert.startswith("WITH run AS (INSERT INTO workflow_executions")
        assert "activity AS (INSERT INTO activity_log" in insert
    async with maker() as session:
        entries = (
            await session.scalars(
                select(ActivityLog).where(
                    ActivityLog.workspace_id == workspace.id,
                    ActivityLog.action == "execution.start",
                )
            )
        ).all()
    assert len(entries) == 1
    [entry] = entries
    assert entry.resource_type == "execution" and entry.resource_id == run_id
    assert entry.user_id == editor.user.id and entry.api_key_id is None
    assert entry.details == {"workflow_id": workflow["id"], "version": workflow["version"]}
    assert entry.user_agent == "h25/1" and entry.ip
    assert entry.created_at is not None and isinstance(entry.id, uuid.UUID)
    # One notice, after the commit, as `record` announced it; none for the replay.
    assert len(heard) == 1, heard
    notice = heard[0]
    assert notice["resource_type"] == "execution" and notice["resource_id"] == run_id
    assert notice["actor"] == str(editor.user.id)
    assert notice["workspace_id"] == str(workspace.id)
    assert notice["data"] == {"workflow_id": workflow["id"], "version": workflow["version"]}
