"""The runner against real PostgreSQL, called directly (no broker): checkpoints,
branches, retries (in place and parked), failures, cancel, resume after a crash,
leases, and the SSRF guard on HTTP nodes."""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.executions import lifecycle
from backend.kit.db import UnitOfWork
from backend.kit.http_guard import guarded_client
from backend.models import (
    Credential,
    NodeExecution,
    WorkflowExecution,
    Workspace,
)
from tests.support.definitions import chain, trig
from tests.support.engine import Enqueued, error_of, model_runner, start, state
from tests.support.factories import AgentFactory, CredentialFactory, UserFactory, create
from tests.support.procs import eventually
from tests.support.target import Target, http_target
from workers.engine.runner import Runner

pytestmark = pytest.mark.xdist_group("engine")


async def test_a_chain_runs_to_completion_with_every_node_checkpointed(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace
) -> None:
    execution_id = await start(maker, workspace, chain(10), {"x": 1})
    assert await runner.execute(execution_id) == "completed"
    ex, rows = await state(maker, execution_id)
    assert ex.status == "completed"
    assert ex.output == {"n9": 11}
    assert ex.lease_owner is None
    assert ex.duration_ms is not None
    assert {r.status for r in rows.values()} == {"completed"}
    assert len(rows) == 11
    assert rows["n4"].output == 6
    # A second delivery of a finished run does nothing.
    assert await runner.execute(execution_id) == "not_claimed"


async def test_if_runs_one_branch_and_skips_the_other(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace
) -> None:
    d = {
        "nodes": [
            trig(),
            {
                "id": "check",
                "type": "logic",
                "config": {"kind": "if", "condition": "trigger.amount > 100"},
            },
            {"id": "big", "type": "logic", "config": {"kind": "transform", "template": '"big"'}},
            {
                "id": "small",
                "type": "logic",
                "config": {"kind": "transform", "template": '"small"'},
            },
            {
                "id": "after_small",
                "type": "logic",
                "config": {"kind": "set", "variables": {"seen": "1"}},
            },
            {"id": "join", "type": "logic", "config": {"kind": "merge", "mode": "all"}},
        ],
        "connections": [
            {"source": "start", "target": "check"},
            {"source": "check", "target": "big", "branch": "true"},
            {"source": "check", "target": "small", "branch": "false"},
            {"source": "small", "target": "after_small"},
            {"source": "big", "target": "join"},
            {"source": "after_small", "target": "join"},
        ],
    }
    execution_id = await start(maker, workspace, d, {"amount": 500})
    assert await runner.execute(execution_id) == "completed"
    ex, rows = await state(maker, execution_id)
    assert {n: r.status for n, r in rows.items()} == {
        "start": "completed",
        "check": "completed",
        "big": "completed",
        "small": "skipped",
        "after_small": "skipped",
        "join": "completed",
    }
    assert rows["check"].branch == "true"
    assert ex.output == {"join": {"big": "big"}}


def http_node(url: str, **extra: Any) -> dict[str, Any]:
    return {"id": "call", "type": "action", "config": {"kind": "http_request", "url": url}, **extra}


def one_call(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "nodes": [trig(), http_node(url, **extra)],
        "connections": [{"source": "start", "target": "call"}],
    }


async def test_a_transient_failure_is_retried_in_place_then_succeeds(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace, target: Target
) -> None:
    key = uuid.uuid4().hex[:8]
    d = one_call(f"{target.base}/flaky/{key}/2", retry={"max_retries": 3, "backoff_s": [0.05]})
    execution_id = await start(maker, workspace, d)
    assert await runner.execute(execution_id) == "completed"
    _, rows = await state(maker, execution_id)
    assert rows["call"].attempt == 3
    assert rows["call"].output["status"] == 200
    assert target.hits[f"flaky/{key}/2"] == 3


async def test_a_long_retry_wait_parks_the_run_instead_of_holding_the_worker(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace, target: Target
) -> None:
    key = uuid.uuid4().hex[:8]
    d = one_call(f"{target.base}/flaky/{key}/1", retry={"max_retries": 2, "backoff_s": [30]})
    execution_id = await start(maker, workspace, d)
    assert await runner.execute(execution_id) == "parked"
    ex, rows = await state(maker, execution_id)
    assert (ex.status, ex.lease_owner, rows["call"].status) == ("pending", None, "retrying")
    assert ex.resume_at is not None
    enqueued = runner.enqueue
    assert isinstance(enqueued, Enqueued)
    assert enqueued[-1][0] == execution_id
    assert 25 <= enqueued[-1][1] <= 30
    # Too early: a delivery before resume_at does nothing.
    assert await runner.execute(execution_id) == "not_claimed"
    async with UnitOfWork(maker) as uow:
        past = ex.resume_at.replace(year=2000)
        await uow.session.execute(
            update(WorkflowExecution)
            .where(WorkflowExecution.id == execution_id)
            .values(resume_at=past)
        )
        await uow.session.execute(
            update(NodeExecution)
            .where(NodeExecution.execution_id == execution_id)
            .values(next_attempt_at=past)
        )
    assert await runner.execute(execution_id) == "completed"
    _, rows = await state(maker, execution_id)
    assert rows["call"].attempt == 2


async def test_cancelling_a_parked_run_ends_its_retry_wait_with_history(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace, target: Target
) -> None:
    key = uuid.uuid4().hex[:8]
    d = one_call(f"{target.base}/flaky/{key}/1", retry={"max_retries": 2, "backoff_s": [30]})
    execution_id = await start(maker, workspace, d)
    assert await runner.execute(execution_id) == "parked"
    async with UnitOfWork(maker) as uow:
        ex = await uow.session.get(WorkflowExecution, execution_id, with_for_update=True)
        assert ex is not None
        await lifecycle.cancel_tree(uow, ex, datetime.now(UTC), actor="user:test")
    ex, rows = await state(maker, execution_id)
    assert (ex.status, rows["call"].status) == ("cancelled", "cancelled")
    async with maker() as session:
        history = await lifecycle.history(session, execution_id)
    node_rows = [(h.from_status, h.to_status, h.actor) for h in history if h.node_id == "call"]
    assert node_rows[-1] == ("retrying", "cancelled", "user:test")


async def test_a_permanent_failure_fails_the_run_at_once(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace, target: Target
) -> None:
    d = one_call(f"{target.base}/status/404")
    d["nodes"].append(
        {"id": "never", "type": "logic", "config": {"kind": "transform", "template": "x"}}
    )
    d["connections"].append({"source": "call", "target": "never"})
    execution_id = await start(maker, workspace, d)
    assert await runner.execute(execution_id) == "failed"
    ex, rows = await state(maker, execution_id)
    assert rows["call"].attempt == 1
    assert error_of(rows["call"])["class"] == "permanent"
    assert error_of(ex)["node_id"] == "call"
    assert "never" not in rows or rows["never"].status != "completed"


async def test_continue_on_error_takes_the_error_branch(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace, target: Target
) -> None:
    d = one_call(f"{target.base}/status/400", continue_on_error=True)
    d["nodes"] += [
        {
            "id": "fallback",
            "type": "logic",
            "config": {"kind": "transform", "template": '"handled"'},
        },
        {"id": "happy", "type": "logic", "config": {"kind": "transform", "template": '"ok"'}},
    ]
    d["connections"] += [
        {"source": "call", "target": "fallback", "branch": "error"},
        {"source": "call", "target": "happy"},
    ]
    execution_id = await start(maker, workspace, d)
    assert await runner.execute(execution_id) == "completed"
    ex, rows = await state(maker, execution_id)
    assert (rows["fallback"].status, rows["happy"].status) == ("completed", "skipped")
    assert ex.output == {"fallback": "handled"}


async def test_cancel_is_prompt_and_aborts_the_call_in_flight(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace, target: Target
) -> None:
    key = uuid.uuid4().hex[:8]
    execution_id = await start(maker, workspace, one_call(f"{target.base}/slow/10?n={key}"))
    task = asyncio.create_task(runner.execute(execution_id))
    await eventually(lambda: target.query_hits[key] == 1, timeout_s=10, what="the call to start")
    requested = time.monotonic()
    async with UnitOfWork(maker) as uow:
        await uow.session.execute(
            update(WorkflowExecution)
            .where(WorkflowExecution.id == execution_id)
            .values(cancel_requested_at=WorkflowExecution.created_at)
        )
    assert await asyncio.wait_for(task, 5) == "cancelled"
    assert time.monotonic() - requested < 1.0
    ex, rows = await state(maker, execution_id)
    assert (ex.status, rows["call"].status) == ("cancelled", "cancelled")


async def test_a_redelivered_run_resumes_from_its_checkpoints(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace, target: Target
) -> None:
    key = uuid.uuid4().hex[:8]
    d = {
        "nodes": [
            trig(),
            *[
                {
                    "id": f"c{i}",
                    "type": "action",
                    "config": {"kind": "http_request", "url": f"{target.base}/side/{key}/{i}"},
                }
                for i in range(4)
            ],
        ],
        "connections": [
            {"source": "start", "target": "c0"},
            *[{"source": f"c{i}", "target": f"c{i + 1}"} for i in range(3)],
        ],
    }
    execution_id = await start(maker, workspace, d)
    assert await runner.execute(execution_id) == "completed"
    # Pretend the worker died after c1: its later checkpoints vanish, the run is running
    # again with a lapsed lease (what the reaper then hands on).
    async with UnitOfWork(maker) as uow:
        await uow.session.execute(
            delete(NodeExecution).where(
                NodeExecution.execution_id == execution_id, NodeExecution.node_id.in_(["c2", "c3"])
            )
        )
        await uow.session.execute(
            update(WorkflowExecution)
            .where(WorkflowExecution.id == execution_id)
            .values(
                status="running",
                finished_at=None,
                lease_owner="dead-worker",
                lease_expires_at=WorkflowExecution.created_at,
            )
        )
    assert await runner.execute(execution_id) == "completed"
    assert [target.hits[f"side/{key}/{i}"] for i in range(4)] == [1, 1, 2, 2]


async def test_a_live_lease_makes_a_second_delivery_a_no_op(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace, target: Target
) -> None:
    key = uuid.uuid4().hex[:8]
    execution_id = await start(maker, workspace, one_call(f"{target.base}/slow/1?n={key}"))
    first = asyncio.create_task(runner.execute(execution_id))
    # The first delivery holds the lease once its call is in flight.
    await eventually(lambda: target.query_hits[key] == 1, timeout_s=10, what="the call to start")
    other = Runner(runner.settings, maker, runner.http, "another-worker", Enqueued())
    assert await other.execute(execution_id) == "not_claimed"
    assert await first == "completed"
    assert target.hits["slow/1"] == 1


@pytest.mark.parametrize(
    "url",
    [
        "http://192.0.0.192/",
        "http://[2002:a9fe:a9fe::1]/",
        "http://127.0.0.2:9/",
        "http://[::1]:9/",
        "http://169.254.169.254/latest/meta-data",
        "http://10.1.2.3/",
    ],
)
async def test_private_addresses_are_refused(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace, url: str
) -> None:
    execution_id = await start(maker, workspace, one_call(url))
    assert await runner.execute(execution_id) == "failed"
    _, rows = await state(maker, execution_id)
    assert "may not reach" in error_of(rows["call"])["message"]
    assert rows["call"].attempt == 1


async def test_a_redirect_to_a_private_address_is_refused(
    maker: async_sessionmaker[AsyncSession], runner: Runner, workspace: Workspace
) -> None:
    # The target on 127.0.0.2 is allowed; it redirects to 127.0.0.1, which is not.
    with http_target("127.0.0.2") as allowed, http_target() as forbidden:
        settings = runner.settings.model_copy(
            update={
                "http": runner.settings.http.model_copy(
                    update={"allow_private_networks": ["127.0.0.2/32"]}
                )
            }
        )
        async with guarded_client(["127.0.0.2/32"]) as http:
            guarded = Runner(settings, maker, http, "redirect-test", Enqueued())
            execution_id = await start(
                maker, workspace, one_call(f"{allowed.base}/redirect?to={forbidden.base}/ok")
            )
            assert await guarded.execute(execution_id) == "failed"
        _, rows = await state(maker, execution_id)
        assert "127.0.0.1" in error_of(rows["call"])["message"]
        assert forbidden.hits["ok"] == 0
        assert allowed.hits["redirect"] == 1


async def test_retry_from_a_failed_run_reuses_completed_nodes(
    maker: async_sessionmaker[AsyncSession], runner: Runner, workspace: Workspace, target: Target
) -> None:
    from backend.auth.dependencies import Principal, WorkspaceAccess
    from backend.auth.permissions import Role
    from backend.executions import service

    key = uuid.uuid4().hex[:8]
    d = {
        "nodes": [
            trig(),
            {
                "id": "once",
                "type": "action",
                "config": {"kind": "http_request", "url": f"{target.base}/once/{key}"},
            },
            http_node(f"{target.base}/status/500", retry={"max_retries": 0}),
        ],
        "connections": [
            {"source": "start", "target": "once"},
            {"source": "once", "target": "call"},
        ],
    }
    execution_id = await start(maker, workspace, d)
    assert await runner.execute(execution_id) == "failed"
    async with UnitOfWork(maker) as uow:
        source = await uow.session.get(WorkflowExecution, execution_id)
        user = await create(uow.session, UserFactory)
        access = WorkspaceAccess(Principal(user=user), workspace, Role.OWNER, resource=source)
        retried = await service.retry(uow, access)
        uow._after_commit.clear()  # no broker here: the test runs it directly
    copy_of = copy.copy(retried.id)
    assert await runner.execute(copy_of) == "failed"
    _, rows = await state(maker, copy_of)
    assert rows["once"].status == "completed"
    assert target.hits[f"once/{key}"] == 1
    assert rows["call"].attempt == 1


async def test_an_agent_node_counts_its_tokens_on_the_node_and_the_run(
    maker: async_sessionmaker[AsyncSession], runner: Runner, workspace: Workspace
) -> None:

    from tests.support.fake_anthropic import fake_anthropic

    with fake_anthropic() as (url, _):
        agent_runner = model_runner(runner, maker, url, "agent-test")
        d = {
            "nodes": [
                trig(),
                {
                    "id": "think",
                    "type": "agent",
                    "config": {
                        "model": "claude-sonnet-5-5",
                        "prompt": "Summarise {{ trigger.text }}",
                    },
                },
            ],
            "connections": [{"source": "start", "target": "think"}],
        }
        execution_id = await start(maker, workspace, d, {"text": "the quarter"})
        assert await agent_runner.execute(execution_id) == "completed"
        loop_id = await start(
            maker,
            workspace,
            {
                **d,
                "nodes": [
                    trig(),
                    {
                        "id": "think",
                        "type": "agent",
                        "config": {
                            "model": "claude-haiku-4-5",
                            "prompt": "loop forever",
                            "max_iterations": 2,
                        },
                    },
                ],
            },
        )
        # No tools: the fake answers plainly, so use a tool-less loop check below.
        assert await agent_runner.execute(loop_id) == "completed"
    ex, rows = await state(maker, execution_id)
    assert rows["think"].output["text"] == "echo: Summarise the quarter"
    assert (rows["think"].input_tokens, rows["think"].output_tokens) == (10, 7)
    assert (ex.input_tokens, ex.output_tokens) == (10, 7)
    assert ex.cost_usd == pytest.approx((10 * 3 + 7 * 15) / 1_000_000)


@pytest.mark.parametrize(
    ("prompt", "status", "attempts", "error_class"),
    [
        ("ratelimit-once please", "completed", 2, None),
        ("overloaded", "failed", 2, "overloaded"),
        ("spend it all", "failed", 1, "permanent"),
    ],
)
async def test_agent_node_retries_what_is_transient_only(
    maker: async_sessionmaker[AsyncSession],
    runner: Runner,
    workspace: Workspace,
    prompt: str,
    status: str,
    attempts: int,
    error_class: str | None,
) -> None:

    from tests.support.fake_anthropic import fake_anthropic

    with fake_anthropic() as (url, _):
        agent_runner = model_runner(runner, maker, url, "agent-retry")
        node = {
            "id": "think",
            "type": "agent",
            "config": {"model": "claude-sonnet-5-5", "prompt": prompt},
            "retry": {"max_retries": 1, "backoff_s": [0.01]},
        }
        execution_id = await start(
            maker,
            workspace,
            {"nodes": [trig(), node], "connections": [{"source": "start", "target": "think"}]},
        )
        assert await agent_runner.execute(execution_id) == status
    _, rows = await state(maker, execution_id)
    assert rows["think"].attempt == attempts
    if error_class:
        assert error_of(rows["think"])["class"] == error_class


async def test_agent_node_at_max_iterations_fails_clearly(
    maker: async_sessionmaker[AsyncSession], runner: Runner, workspace: Workspace
) -> None:

    from tests.support.fake_anthropic import fake_anthropic

    async with UnitOfWork(maker) as uow:
        agent = await create(
            uow.session,
            AgentFactory,
            workspace_id=workspace.id,
            name="looper",
            max_tokens=100,
            tools=[{"type": "builtin", "name": "current_time"}],
        )
    with fake_anthropic() as (url, _):
        agent_runner = model_runner(runner, maker, url, "agent-loop")
        node = {
            "id": "think",
            "type": "agent",
            "config": {"agent_id": str(agent.id), "prompt": "loop forever", "max_iterations": 3},
        }
        execution_id = await start(
            maker,
            workspace,
            {"nodes": [trig(), node], "connections": [{"source": "start", "target": "think"}]},
        )
        assert await agent_runner.execute(execution_id) == "failed"
    ex, rows = await state(maker, execution_id)
    assert "max_iterations" in error_of(rows["think"])["message"]
    assert ex.status == "failed"


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ '{0.__class__}'.format(trigger) }}",
        "{{ trigger|attr('__class__') }}",
        "{{ range(10**9)|list|length }}",
        "{{ 'a' * 10**8 }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ lipsum.__globals__['os'] }}",
    ],
)
async def test_template_escapes_are_refused_quickly(
    maker: async_sessionmaker[AsyncSession], runner: Runner, workspace: Workspace, source: str
) -> None:
    d = {
        "nodes": [
            trig(),
            {"id": "t", "type": "logic", "config": {"kind": "transform", "template": source}},
        ],
        "connections": [{"source": "start", "target": "t"}],
    }
    execution_id = await start(maker, workspace, d)
    began = time.monotonic()
    status = await runner.execute(execution_id)
    assert time.monotonic() - began < 2.0
    _, rows = await state(maker, execution_id)
    if status == "completed":
        # Undefined in the sandbox renders as nothing: no class, no globals leaked.
        assert "class" not in str(rows["t"].output) and "module" not in str(rows["t"].output)
    else:
        assert rows["t"].status == "failed"


def for_each(
    items: str,
    body_nodes: list[dict[str, Any]],
    body_connections: list[dict[str, Any]] | None = None,
    **config: Any,
) -> dict[str, Any]:
    return {
        "nodes": [
            trig(),
            {
                "id": "each",
                "type": "logic",
                "config": {
                    "kind": "for_each",
                    "items": items,
                    "body": {"nodes": body_nodes, "connections": body_connections or []},
                    **config,
                },
            },
        ],
        "connections": [{"source": "start", "target": "each"}],
    }


async def test_for_each_over_20_items_checkpoints_every_iteration(
    maker: async_sessionmaker[AsyncSession], runner: Runner, workspace: Workspace
) -> None:
    body = [
        {
            "id": "double",
            "type": "logic",
            "config": {"kind": "transform", "template": "{{ item * 2 }}"},
        },
        {
            "id": "label",
            "type": "logic",
            "config": {
                "kind": "transform",
                "template": '{"i": {{ index }}, "v": {{ nodes.double.output }}}',
            },
        },
    ]
    d = for_each(
        "trigger.numbers", body, [{"source": "double", "target": "label"}], max_concurrency=4
    )
    execution_id = await start(maker, workspace, d, {"numbers": list(range(20))})
    status = await runner.execute(execution_id)
    ex, _ = await state(maker, execution_id)
    assert status == "completed", ex.error
    assert ex.output == {"each": [{"i": i, "v": i * 2} for i in range(20)]}
    async with maker() as session:
        iterations = (
            await session.scalars(
                select(NodeExecution.iteration).where(
                    NodeExecution.execution_id == execution_id,
                    NodeExecution.node_id == "each.label",
                )
            )
        ).all()
    assert sorted(iterations) == list(range(1, 21))


async def test_a_failing_iteration_fails_the_loop_and_stops_the_rest(
    maker: async_sessionmaker[AsyncSession], runner: Runner, workspace: Workspace, target: Target
) -> None:
    key = uuid.uuid4().hex[:8]
    body = [
        {
            "id": "call",
            "type": "action",
            "config": {
                "kind": "http_request",
                "url": target.base
                + "/status/{{ 500 if item == 3 else 200 }}?n="
                + key
                + "-{{ item }}",
            },
            "retry": {"max_retries": 0},
        }
    ]
    d = for_each("trigger.numbers", body)
    d["nodes"][1]["retry"] = {"max_retries": 0}
    execution_id = await start(maker, workspace, d, {"numbers": [1, 2, 3, 4]})
    assert await runner.execute(execution_id) == "failed"
    _, rows = await state(maker, execution_id)
    assert "item 2" in error_of(rows["each"])["message"]
    assert target.query_hits[f"{key}-1"] == 1
    assert target.query_hits[f"{key}-4"] == 0  # sequential: never reached


async def test_a_worker_that_lost_its_lease_writes_nothing(
    maker: async_sessionmaker[AsyncSession], runner: Runner, workspace: Workspace, target: Target
) -> None:
    key = uuid.uuid4().hex[:8]
    execution_id = await start(maker, workspace, one_call(f"{target.base}/slow/3?n={key}"))
    task = asyncio.create_task(runner.execute(execution_id))
    await eventually(lambda: target.query_hits[key] == 1, timeout_s=10, what="the call to start")
    # Another worker took the run over (the reaper decided this one was dead).
    async with UnitOfWork(maker) as uow:
        await uow.session.execute(
            update(WorkflowExecution)
            .where(WorkflowExecution.id == execution_id)
            .values(lease_owner="the-new-owner")
        )
    assert await asyncio.wait_for(task, 5) == "lost_lease"
    ex, rows = await state(maker, execution_id)
    # No cancelled checkpoint, no close: the run is the new owner's to finish.
    assert (ex.status, ex.lease_owner) == ("running", "the-new-owner")
    assert "call" not in rows


async def test_set_variables_survive_a_parked_retry(
    maker: async_sessionmaker[AsyncSession], runner: Runner, workspace: Workspace, target: Target
) -> None:
    key = uuid.uuid4().hex[:8]
    d = {
        "nodes": [
            trig(),
            {
                "id": "remember",
                "type": "logic",
                "config": {"kind": "set", "variables": {"who": '"ada"'}},
            },
            http_node(f"{target.base}/flaky/{key}/1", retry={"max_retries": 2, "backoff_s": [30]}),
            {
                "id": "greet",
                "type": "logic",
                "config": {"kind": "transform", "template": '"hi {{ vars.who }}"'},
            },
        ],
        "connections": [
            {"source": "start", "target": "remember"},
            {"source": "remember", "target": "call"},
            {"source": "call", "target": "greet"},
        ],
    }
    execution_id = await start(maker, workspace, d)
    assert await runner.execute(execution_id) == "parked"
    async with UnitOfWork(maker) as uow:
        await uow.session.execute(
            update(WorkflowExecution)
            .where(WorkflowExecution.id == execution_id)
            .values(resume_at=WorkflowExecution.created_at)
        )
        await uow.session.execute(
            update(NodeExecution)
            .where(NodeExecution.execution_id == execution_id)
            .values(next_attempt_at=NodeExecution.created_at)
        )
    assert await runner.execute(execution_id) == "completed"
    ex, _ = await state(maker, execution_id)
    assert ex.output == {"greet": "hi ada"}


async def test_a_credential_is_injected_at_send_time_and_never_recorded(
    maker: async_sessionmaker[AsyncSession], runner: Runner, workspace: Workspace, target: Target
) -> None:
    canary = "canary-" + uuid.uuid4().hex
    async with UnitOfWork(maker) as uow:
        credential = await create(
            uow.session,
            CredentialFactory,
            workspace_id=workspace.id,
            name=f"c-{canary[-6:]}",
            data={"type": "bearer", "token": canary},
        )
    d = one_call(f"{target.base}/echo")
    d["nodes"][1]["config"]["credential_id"] = str(credential.id)
    execution_id = await start(maker, workspace, d)
    assert await runner.execute(execution_id) == "completed"
    _, rows = await state(maker, execution_id)
    # The target got it...
    assert rows["call"].output["body"]["auth"] == f"Bearer {canary}"
    # ...but that is the target's echo; the node's own record of its input has no secret.
    assert canary not in json.dumps(rows["call"].input)
    async with maker() as session:
        used = await session.get(Credential, credential.id)
        assert used is not None and used.last_used_at is not None
