"""Quotas against real PostgreSQL and Redis: 402 `quota_exceeded` naming the quota, its
limit and reset; usage against each limit; counters that survive a Redis flush (rebuilt
from the rows); reset at the period's end; schedule and event runs skipped with the
reason recorded; agent calls refused past the monthly AI budget; tool calls per hour."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from backend.auth.permissions import Role
from backend.config import Settings
from backend.executions import lifecycle
from backend.kit.db import UnitOfWork, create_sessionmaker
from backend.kit.errors import QuotaExceeded, ValidationFailed
from backend.models import ActivityLog, ToolUsage, Trigger, Workflow, WorkflowExecution, Workspace
from backend.quotas import service as quotas
from backend.triggers.hooks import execution_finished
from backend.triggers.service import dispatch_due
from tests.support.factories import WorkflowExecutionFactory, create
from tests.support.identity import Actor, make_workspace, member
from tests.support.triggers import published, with_trigger


async def _editor(session: AsyncSession, settings: Settings, ws: Workspace) -> Actor:
    actor = await member(session, settings, ws, Role.EDITOR)
    actor.headers["X-Workspace-ID"] = str(ws.id)
    return actor


async def _start(client: httpx.AsyncClient, actor: Actor, workflow: Workflow) -> httpx.Response:
    return await client.post(
        "/api/v1/executions", headers=actor.headers, json={"workflow_id": str(workflow.id)}
    )


async def _usage(client: httpx.AsyncClient, actor: Actor, ws: Workspace) -> dict[str, Any]:
    r = await client.get(f"/api/v1/workspaces/{ws.id}/usage", headers=actor.headers)
    assert r.status_code == 200, r.text
    return {q["quota"]: q for q in r.json()["quotas"]}


async def _flush(ws: Workspace) -> None:
    # This workspace's counters only: the Redis is shared with other tests.
    redis = quotas.redis_client()
    keys = [k async for k in redis.scan_iter(match=f"quota:{ws.id}:*")]
    if keys:
        await redis.delete(*keys)


def _next_midnight() -> datetime:
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)


async def test_runs_per_day_refuses_with_402_naming_the_quota_and_survives_a_flush(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    ws = await make_workspace(session)
    actor = await _editor(session, settings, ws)
    workflow = await published(session, ws, with_trigger({"kind": "manual"}))
    await quotas.set_overrides(session, ws.id, {"runs_per_day": 3})
    for _ in range(3):
        assert (await _start(client, actor, workflow)).status_code == 202
    r = await _start(client, actor, workflow)
    assert r.status_code == 402, r.text
    body = r.json()
    assert (body["error"], body["quota"], body["limit"], body["used"]) == (
        "quota_exceeded", "runs_per_day", 3, 3,
    )  # fmt: skip
    assert datetime.fromisoformat(body["resets_at"]) == _next_midnight()
    assert "runs_per_day" in body["detail"]
    usage = await _usage(client, actor, ws)
    assert usage["runs_per_day"]["used"] == 3 and usage["runs_per_day"]["exceeded"] is True
    assert usage["runs_per_day"]["remaining"] == 0
    # Redis loses the counter: it is rebuilt from the rows, not started again at 0.
    await _flush(ws)
    assert (await _start(client, actor, workflow)).status_code == 402
    # A batch is admitted (or refused) as a whole.
    await quotas.set_overrides(session, ws.id, {"runs_per_day": 5})
    batch = {"workflow_id": str(workflow.id), "items": [{"trigger_data": {}}] * 3}
    r = await client.post("/api/v1/executions/batch", headers=actor.headers, json=batch)
    assert (r.status_code, r.json()["quota"]) == (402, "runs_per_day")
    batch["items"] = batch["items"][:2]
    r = await client.post("/api/v1/executions/batch", headers=actor.headers, json=batch)
    assert r.status_code == 202, r.text
    runs = await session.scalar(select(func.count()).where(WorkflowExecution.workspace_id == ws.id))
    assert runs == 5


async def test_an_idempotent_replay_takes_no_second_place_in_the_quota(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    ws = await make_workspace(session)
    actor = await _editor(session, settings, ws)
    workflow = await published(session, ws, with_trigger({"kind": "manual"}))
    await quotas.set_overrides(session, ws.id, {"runs_per_day": 2})
    headers = {**actor.headers, "Idempotency-Key": "same"}
    body = {"workflow_id": str(workflow.id)}
    for _ in range(4):
        r = await client.post("/api/v1/executions", headers=headers, json=body)
        assert r.status_code in (200, 202), r.text
    assert (await _usage(client, actor, ws))["runs_per_day"]["used"] == 1
    assert (await _start(client, actor, workflow)).status_code == 202
    assert (await _start(client, actor, workflow)).status_code == 402
    # At the limit, a retry of the keyed start still answers its run (nothing new is
    # started); a new key is refused.
    r = await client.post("/api/v1/executions", headers=headers, json=body)
    assert r.status_code == 200, r.text
    r = await client.post(
        "/api/v1/executions", headers={**actor.headers, "Idempotency-Key": "new"}, json=body
    )
    assert r.status_code == 402, r.text


async def test_the_day_quota_resets_when_the_day_ends(
    session: AsyncSession, sessionmaker: async_sessionmaker[AsyncSession], monkeypatch: Any
) -> None:
    ws = await make_workspace(session)
    workflow = await published(session, ws, with_trigger({"kind": "manual"}))
    await quotas.set_overrides(session, ws.id, {"runs_per_day": 1})

    async def start() -> None:
        async with UnitOfWork(sessionmaker) as uow:
            from backend.executions import lifecycle

            await lifecycle.create_run(
                uow, workspace_id=ws.id, workflow_id=workflow.id, version=1,
                trigger_type="manual", trigger_data={}, actor="user:test", enqueue=False,
            )  # fmt: skip

    await start()
    with pytest.raises(QuotaExceeded) as refused:
        await start()
    assert refused.value.extra["quota"] == "runs_per_day"
    # The next day: a new period, counted from that day's runs (none yet).
    tomorrow = _next_midnight() + timedelta(minutes=1)
    monkeypatch.setattr(quotas, "_now", lambda: tomorrow)
    await start()
    await session.execute(
        update(WorkflowExecution)
        .where(WorkflowExecution.workspace_id == ws.id)
        .values(created_at=func.greatest(WorkflowExecution.created_at, tomorrow))
    )
    with pytest.raises(QuotaExceeded):
        await start()


async def test_concurrent_runs_count_unfinished_runs_and_free_up_as_they_end(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    ws = await make_workspace(session)
    actor = await _editor(session, settings, ws)
    workflow = await published(session, ws, with_trigger({"kind": "manual"}))
    await quotas.set_overrides(session, ws.id, {"concurrent_runs": 2})
    first = (await _start(client, actor, workflow)).json()["id"]
    assert (await _start(client, actor, workflow)).status_code == 202
    r = await _start(client, actor, workflow)
    assert r.status_code == 402
    assert (r.json()["quota"], r.json()["limit"], r.json()["resets_at"]) == (
        "concurrent_runs", 2, None,
    )  # fmt: skip
    usage = await _usage(client, actor, ws)
    assert (usage["concurrent_runs"]["used"], usage["concurrent_runs"]["period"]) == (
        2, "concurrent",
    )  # fmt: skip
    await session.execute(
        update(WorkflowExecution)
        .where(WorkflowExecution.id == uuid.UUID(first))
        .values(status="completed", finished_at=func.now())
    )
    assert (await _start(client, actor, workflow)).status_code == 202


async def test_a_webhook_over_quota_is_refused_with_402(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    ws = await make_workspace(session)
    workflow = await published(
        session, ws, with_trigger({"kind": "webhook", "verify_signature": False})
    )
    trigger = await session.scalar(select(Trigger).where(Trigger.workflow_id == workflow.id))
    assert trigger is not None
    await quotas.set_overrides(session, ws.id, {"runs_per_day": 0})
    r = await client.post(f"/api/v1/hooks/{trigger.token}", json={"a": 1})
    assert (r.status_code, r.json()["error"], r.json()["quota"]) == (
        402, "quota_exceeded", "runs_per_day",
    )  # fmt: skip


async def test_a_schedule_over_quota_skips_its_slot_and_says_why(
    session: AsyncSession, sessionmaker: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    ws = await make_workspace(session)
    t0 = datetime.now(UTC).replace(second=30, microsecond=0)
    workflow = await published(
        session, ws, with_trigger({"kind": "schedule", "cron": "* * * * *"}), now=t0
    )
    await quotas.set_overrides(session, ws.id, {"runs_per_day": 0})
    async with UnitOfWork(sessionmaker) as uow:
        started = await dispatch_due(uow, settings, t0 + timedelta(minutes=1))
    assert started == []
    trigger = await session.scalar(
        select(Trigger)
        .where(Trigger.workflow_id == workflow.id)
        .execution_options(populate_existing=True)
    )
    assert trigger is not None and trigger.next_run_at is not None
    assert trigger.next_run_at > t0 + timedelta(minutes=1)  # the dispatcher moved on
    note = await session.scalar(
        select(ActivityLog).where(
            ActivityLog.workspace_id == ws.id, ActivityLog.action == "quota.run_skipped"
        )
    )
    assert note is not None and note.resource_id == str(trigger.id)
    assert (note.details["quota"], note.details["trigger_type"]) == ("runs_per_day", "schedule")


async def test_an_event_run_over_quota_is_skipped_and_the_source_run_still_closes(
    session: AsyncSession, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    ws = await make_workspace(session)
    source = await published(session, ws, with_trigger({"kind": "manual"}))
    listener = await published(
        session,
        ws,
        with_trigger({"kind": "event", "workflow_id": str(source.id)}, node_id="after"),
    )
    await quotas.set_overrides(session, ws.id, {"concurrent_runs": 0})
    run = await create(
        session, WorkflowExecutionFactory, workspace_id=ws.id, workflow_id=source.id,
        status="completed",
    )  # fmt: skip
    async with UnitOfWork(sessionmaker) as uow:  # no exception: the close commits
        await execution_finished(uow, run)
    started = await session.scalar(
        select(func.count()).where(WorkflowExecution.workflow_id == listener.id)
    )
    assert started == 0
    note = await session.scalar(select(ActivityLog).where(ActivityLog.workspace_id == ws.id))
    assert note is not None and note.action == "quota.run_skipped"
    assert (note.details["quota"], note.details["trigger_type"]) == ("concurrent_runs", "event")


async def test_ai_tokens_and_cost_per_month_are_checked_before_an_agent_call(
    session: AsyncSession,
) -> None:
    ws = await make_workspace(session)
    workflow = await published(session, ws, with_trigger({"kind": "manual"}))
    await create(
        session, WorkflowExecutionFactory, workspace_id=ws.id, workflow_id=workflow.id,
        status="completed", input_tokens=600, output_tokens=400, cost_usd=0.5,
    )  # fmt: skip
    await quotas.set_overrides(session, ws.id, {"ai_tokens_per_month": 5000})
    await quotas.check_ai(session, ws.id)  # 1000 of 5000
    await quotas.spend_ai(ws.id, 4000, 0.25)  # counted at once, before any row says so
    with pytest.raises(QuotaExceeded) as refused:
        await quotas.check_ai(session, ws.id)
    assert (refused.value.extra["quota"], refused.value.extra["used"]) == (
        "ai_tokens_per_month", 5000,
    )  # fmt: skip
    await quotas.set_overrides(session, ws.id, {"ai_tokens_per_month": None})
    # Spent money is in the run rows: 0.5 of 0.5 used.
    await quotas.set_overrides(session, ws.id, {"ai_cost_per_month_usd": 0.5})
    with pytest.raises(QuotaExceeded) as refused:
        await quotas.check_ai(session, ws.id)
    assert refused.value.extra["quota"] == "ai_cost_per_month_usd"
    start = datetime.fromisoformat(str(refused.value.extra["resets_at"]))
    assert start.day == 1 and start > datetime.now(UTC)


async def test_tool_calls_per_hour_are_counted_from_tool_usage(session: AsyncSession) -> None:
    ws = await make_workspace(session)
    for _ in range(2):
        session.add(ToolUsage(workspace_id=ws.id, tool="chat"))
    await session.flush()
    await quotas.set_overrides(session, ws.id, {"tool_calls_per_hour": 3})
    await quotas.admit_tool_calls(session, ws.id)
    with pytest.raises(QuotaExceeded) as refused:
        await quotas.admit_tool_calls(session, ws.id)
    assert (refused.value.extra["quota"], refused.value.extra["used"]) == (
        "tool_calls_per_hour", 3,
    )  # fmt: skip


async def test_settings_give_the_defaults_and_a_workspace_override_wins(
    session: AsyncSession, settings: Settings
) -> None:
    ws = await make_workspace(session)
    strict = settings.model_copy(
        update={"quotas": settings.quotas.model_copy(update={"runs_per_day": 10})}
    )
    quotas.forget(ws.id)
    assert (await quotas.limits_of(session, ws.id, strict))["runs_per_day"] == 10
    await quotas.set_overrides(session, ws.id, {"runs_per_day": None})
    assert (await quotas.limits_of(session, ws.id, strict))["runs_per_day"] is None
    # A tenant's own workspace settings never lift a quota.
    ws.settings = {"quotas": {"runs_per_day": None}}
    await quotas.set_overrides(session, ws.id, {}, replace=True)
    assert (await quotas.limits_of(session, ws.id, strict))["runs_per_day"] == 10


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"runs_per_week": 3}, "runs_per_week"),
        ({"runs_per_day": -1}, "runs_per_day"),
        ({"runs_per_day": True}, "runs_per_day"),
        ({"ai_cost_per_month_usd": "ten"}, "ai_cost_per_month_usd"),
        ({"ai_cost_per_month_usd": float("nan")}, "ai_cost_per_month_usd"),
        ({"ai_cost_per_month_usd": float("inf")}, "ai_cost_per_month_usd"),
    ],
)
def test_bad_overrides_are_refused_naming_the_quota(values: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationFailed) as refused:
        quotas.check_overrides(values)
    assert refused.value.field == field


async def test_usage_is_for_members_only(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    ws, other = await make_workspace(session), await make_workspace(session, "Other")
    viewer = await member(session, settings, ws, Role.VIEWER)
    usage = await _usage(client, viewer, ws)
    assert set(usage) == set(quotas.QUOTAS)
    assert usage["runs_per_day"]["limit"] is None and usage["runs_per_day"]["remaining"] is None
    r = await client.get(f"/api/v1/workspaces/{other.id}/usage", headers=viewer.headers)
    assert r.status_code == 404
    r = await client.get(f"/api/v1/workspaces/{ws.id}/usage")
    assert r.status_code == 401


async def test_redis_being_down_falls_back_to_the_rows(
    session: AsyncSession, monkeypatch: Any
) -> None:
    ws = await make_workspace(session)
    workflow = await published(session, ws, with_trigger({"kind": "manual"}))
    await create(
        session, WorkflowExecutionFactory, workspace_id=ws.id, workflow_id=workflow.id,
        status="pending",
    )  # fmt: skip
    await quotas.set_overrides(session, ws.id, {"runs_per_day": 1})
    # A client pointed at a port nothing listens on: every call fails at once.
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    monkeypatch.setattr(quotas, "redis_client", lambda: dead)
    with pytest.raises(QuotaExceeded):
        await quotas.admit_runs(session, ws.id, 1, trigger_type="manual", actor="user:x", values={})
    await dead.aclose()


async def test_an_agent_node_past_the_monthly_token_quota_fails_without_calling_the_model(
    settings: Settings, maker: async_sessionmaker[AsyncSession], workspace: Workspace
) -> None:
    from pydantic import SecretStr

    from backend.kit.http_guard import guarded_client
    from tests.support.engine import Enqueued, error_of, loopback_settings, start, state
    from tests.support.fake_anthropic import fake_anthropic
    from workers.engine.runner import Runner

    async with UnitOfWork(maker) as uow:
        await quotas.set_overrides(uow.session, workspace.id, {"ai_tokens_per_month": 0})
    with fake_anthropic() as (url, requests):
        anthropic = settings.anthropic.model_copy(
            update={"api_key": SecretStr("k"), "base_url": url, "max_retries": 0}
        )
        run_settings = loopback_settings(settings).model_copy(update={"anthropic": anthropic})
        async with guarded_client(["127.0.0.1/32"]) as http:
            runner = Runner(run_settings, maker, http, f"quota-{uuid.uuid4().hex[:6]}", Enqueued())
            definition = {
                "nodes": [
                    {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
                    {"id": "think", "type": "agent",
                     "config": {"model": "claude-sonnet-5-5", "prompt": "hi"}},
                ],
                "connections": [{"source": "start", "target": "think"}],
            }  # fmt: skip
            execution_id = await start(maker, workspace, definition)
            assert await runner.execute(execution_id) == "failed"
    _, rows = await state(maker, execution_id)
    error = error_of(rows["think"])
    assert "ai_tokens_per_month" in error["message"] and rows["think"].attempt == 1
    assert requests == []  # the model was never called


async def test_runs_that_were_rolled_back_give_their_places_in_the_day_quota_back(
    client: httpx.AsyncClient,
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
    settings: Settings,
) -> None:
    """A run's place is reserved in Redis before its insert; a unit of work that then
    rolls back (a failed insert, a request that failed after it) never wrote the run,
    and its place is given back: before, it counted until the day ended."""
    ws = await make_workspace(session)
    actor = await _editor(session, settings, ws)
    workflow = await published(session, ws, with_trigger({"kind": "manual"}))
    await quotas.set_overrides(session, ws.id, {"runs_per_day": 2})
    run: dict[str, Any] = {
        "workspace_id": ws.id, "workflow_id": workflow.id, "version": workflow.current_version,
        "trigger_type": "manual", "trigger_data": {}, "actor": None, "enqueue": False,
    }  # fmt: skip
    with pytest.raises(RuntimeError):
        async with UnitOfWork(sessionmaker) as uow:
            assert await lifecycle.create_run(uow, **run) is not None
            raise RuntimeError("the request failed after the insert")
    with pytest.raises(RuntimeError):
        async with UnitOfWork(sessionmaker) as uow:
            rows = [{k: v for k, v in run.items() if k not in ("actor", "enqueue")}] * 2
            assert len(await lifecycle.create_runs(uow, rows, actor=None, reason="t")) == 2
            raise RuntimeError("the batch failed after its insert")
    # An insert that fails itself (no such workflow) gives its place back too.
    with pytest.raises(IntegrityError):
        async with UnitOfWork(sessionmaker) as uow:
            await lifecycle.create_run(uow, **{**run, "workflow_id": uuid.uuid4()})
    assert (await _usage(client, actor, ws))["runs_per_day"]["used"] == 0
    assert (await _start(client, actor, workflow)).status_code == 202
    assert (await _start(client, actor, workflow)).status_code == 202
    assert (await _start(client, actor, workflow)).status_code == 402


async def test_a_place_given_back_after_a_rebuild_is_not_taken_off_twice(
    engine: AsyncEngine, settings: Settings
) -> None:
    """A counter rebuilt (from the committed rows) while a run's transaction was still
    open already leaves that run out; when the transaction then rolls back, its place
    must not be taken off the counter again, or the workspace gets a run past its limit
    (found by a review: 3 runs admitted against a limit of 2)."""
    makers = create_sessionmaker(engine)
    async with UnitOfWork(makers) as uow:
        ws = await make_workspace(uow.session, f"rebuild-{uuid.uuid4().hex[:6]}")
        workflow = await published(uow.session, ws, with_trigger({"kind": "manual"}))
        await quotas.set_overrides(uow.session, ws.id, {"runs_per_day": 2})
    run: dict[str, Any] = {
        "workspace_id": ws.id, "workflow_id": workflow.id, "version": workflow.current_version,
        "trigger_type": "manual", "trigger_data": {}, "actor": "user:t", "enqueue": False,
    }  # fmt: skip
    key = quotas.counter_key(ws.id, "runs_per_day", datetime.now(UTC))
    redis = quotas.redis_client()
    with pytest.raises(RuntimeError):
        async with UnitOfWork(makers) as uow:
            assert await lifecycle.create_run(uow, **run) is not None
            # The counter goes stale and a GET /usage rebuilds it from the rows, which
            # do not hold this uncommitted run.
            await redis.hset(key, "at", "0")
            async with makers() as other:
                used = {q["quota"]: q["used"] for q in await quotas.usage(other, ws.id, settings)}
            assert used["runs_per_day"] == 0
            raise RuntimeError("the request failed after the insert")
    assert float(await redis.hget(key, "v") or 0) == 0
    admitted = 0
    with pytest.raises(QuotaExceeded):
        for _ in range(3):
            async with UnitOfWork(makers) as uow:
                await lifecycle.create_run(uow, **run)
            admitted += 1
    assert admitted == 2
