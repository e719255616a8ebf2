"""The beat task as beat sends it (the scheduler's own apply_async, through the broker)
to a real worker process: it finds the committed run history, stores the suggestion,
announces it on the workspace channel, logs no error, and a second tick adds nothing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from celery.beat import Scheduler
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.kit.celery_app import celery_app
from backend.kit.db import UnitOfWork
from backend.models import WorkflowSuggestion, Workspace
from backend.realtime.events import workspace_channel
from tests.suggestions.history import add_run, failed, ok
from tests.support.factories import create_workflow
from tests.support.procs import wait_for

DEFINITION = {
    "nodes": [
        {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
        {"id": "fetch", "type": "action", "retry": {"max_retries": 0},
         "config": {"kind": "http_request", "url": "https://api.example.com/items"}},
    ],
    "connections": [{"source": "start", "target": "fetch"}],
}  # fmt: skip


def send_as_beat() -> Any:
    scheduler = Scheduler(celery_app, lazy=True)
    scheduler.setup_schedule()
    [entry] = [e for e in scheduler.schedule.values() if e.task == "suggestions.recompute"]
    result = scheduler.apply_async(entry, advance=False)
    result.get(timeout=120, propagate=False)
    return result


@pytest.mark.xdist_group("crossprocess")
async def test_beat_recomputes_suggestions_in_a_real_worker_and_announces_them(
    worker_name: str,
    crossprocess_logs: Path,
    settings: Settings,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
) -> None:
    async with UnitOfWork(maker) as uow:
        wf = await create_workflow(uow.session, workspace.id, DEFINITION, name="Beat")
        for _ in range(3):
            await add_run(
                uow.session, workspace.id, wf.id, {"start": ok(1), "fetch": failed("timeout")}
            )
    log = crossprocess_logs / "worker.log"
    start = log.stat().st_size
    redis = Redis.from_url(settings.redis_url)
    pubsub = redis.pubsub()
    await pubsub.subscribe(workspace_channel(workspace.id))

    first = await asyncio.to_thread(send_as_beat)
    assert first.status == "SUCCESS", repr(first.result)
    assert first.result["added"] >= 1 and first.result["failed"] == 0

    async with maker() as session:
        rows = (
            await session.scalars(
                select(WorkflowSuggestion).where(WorkflowSuggestion.workflow_id == wf.id)
            )
        ).all()
    assert [(r.kind, r.status, r.source, r.base_version) for r in rows] == [
        ("missing_retry", "open", "history", 1)
    ]
    assert rows[0].evidence["transient_failures"] == {"timeout": 3}

    heard: dict[str, Any] | None = None
    async with asyncio.timeout(10):
        while heard is None:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if message is not None:
                body = json.loads(message["data"])
                if body["type"] == "workflow.suggestions" and body["resource_id"] == str(wf.id):
                    heard = body
    assert heard["data"]["added"] == [str(rows[0].id)] and heard["data"]["open"] == 1
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await redis.aclose()

    # Safe to run twice: the finding is refreshed, not added again.
    second = await asyncio.to_thread(send_as_beat)
    assert second.status == "SUCCESS", repr(second.result)
    async with maker() as session:
        again = (
            await session.scalars(
                select(WorkflowSuggestion.id).where(WorkflowSuggestion.workflow_id == wf.id)
            )
        ).all()
    assert again == [rows[0].id]

    ids = {first.id, second.id}

    def logged() -> bool:
        text = log.read_bytes()[start:].decode(errors="replace")
        return all(f"[{task_id}] succeeded" in text for task_id in ids)

    wait_for(logged, timeout_s=10, what="the worker's log lines for suggestions.recompute")
    text = log.read_bytes()[start:].decode(errors="replace")
    errors = [
        line
        for line in text.splitlines()
        if any(mark in line for mark in ("[error", "[critical", "Traceback", "raised unexpected"))
    ]
    assert errors == [], "\n".join(errors)
