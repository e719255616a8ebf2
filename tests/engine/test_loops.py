"""While loops and sub-workflows through the runner on real PostgreSQL: passes
checkpointed and bounded, child runs linked to their parent, depth-limited, found again
after a crash and cancelled with their parent."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.kit.db import UnitOfWork
from backend.models import NodeExecution, WorkflowExecution, Workspace
from tests.support.definitions import trig
from tests.support.engine import Enqueued, error_of, start, state
from tests.support.factories import create_workflow
from tests.support.procs import eventually
from tests.support.target import Target
from workers.engine.runner import Runner

pytestmark = pytest.mark.xdist_group("engine")


def transform(node_id: str, template: str) -> dict[str, Any]:
    return {"id": node_id, "type": "logic", "config": {"kind": "transform", "template": template}}


def flow(*nodes: dict[str, Any]) -> dict[str, Any]:
    """A chain: trigger, then the nodes in order."""
    ids = ["start", *(n["id"] for n in nodes)]
    return {
        "nodes": [trig(), *nodes],
        "connections": [{"source": a, "target": b} for a, b in itertools.pairwise(ids)],
    }


async def saved(
    maker: async_sessionmaker[AsyncSession], workspace: Workspace, definition: dict[str, Any]
) -> uuid.UUID:
    async with UnitOfWork(maker) as uow:
        wf = await create_workflow(uow.session, workspace.id, definition, name="child")
        return wf.id


async def children(
    maker: async_sessionmaker[AsyncSession], parent: uuid.UUID
) -> list[WorkflowExecution]:
    async with maker() as session:
        rows = await session.scalars(
            select(WorkflowExecution)
            .where(WorkflowExecution.parent_execution_id == parent)
            .order_by(WorkflowExecution.created_at)
        )
        return list(rows.all())


def sub_node(workflow_id: uuid.UUID, node_id: str = "sub", **extra: Any) -> dict[str, Any]:
    config = {"kind": "sub_workflow", "workflow_id": str(workflow_id), **extra}
    return {"id": node_id, "type": "integration", "config": config}


def while_node(condition: str, max_iterations: int, **body: Any) -> dict[str, Any]:
    return {
        "id": "loop",
        "type": "logic",
        "config": {
            "kind": "while",
            "condition": condition,
            "max_iterations": max_iterations,
            **body,
        },
    }


async def test_while_runs_its_body_until_the_condition_fails(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace
) -> None:
    body = {"nodes": [transform("add", "{{ (last or trigger.start) + iteration + 1 }}")]}
    definition = flow(
        while_node("last is none or last < 10", 20, body=body),
        transform("after", "{{ nodes.loop.output.last }}"),
    )
    execution_id = await start(maker, workspace, definition, {"start": 1})
    assert await runner.execute(execution_id) == "completed"
    ex, rows = await state(maker, execution_id)
    # 1 -> 2 -> 4 -> 7 -> 11: four passes, then the condition is false.
    assert ex.output == {"after": 11}
    assert rows["loop"].output == {"iterations": 4, "last": 11}
    async with maker() as session:
        passes = (
            await session.execute(
                select(NodeExecution.iteration, NodeExecution.output)
                .where(
                    NodeExecution.execution_id == execution_id, NodeExecution.node_id == "loop.add"
                )
                .order_by(NodeExecution.iteration)
            )
        ).all()
    assert [tuple(p) for p in passes] == [(1, 2), (2, 4), (3, 7), (4, 11)]


async def test_while_fails_clearly_at_max_iterations(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace
) -> None:
    body = {"nodes": [transform("tick", "{{ iteration }}")]}
    execution_id = await start(maker, workspace, flow(while_node("true", 3, body=body)))
    assert await runner.execute(execution_id) == "failed"
    ex, rows = await state(maker, execution_id)
    assert rows["loop"].status == "failed"
    assert "max_iterations (3)" in error_of(rows["loop"])["message"]
    assert error_of(ex)["node_id"] == "loop"
    assert {r.iteration for r in rows.values() if r.node_id == "loop.tick"} <= {1, 2, 3}


async def test_a_sub_workflow_runs_as_a_linked_child_and_returns_its_output(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace
) -> None:
    child_wf = await saved(maker, workspace, flow(transform("double", "{{ trigger.x * 2 }}")))
    sub = sub_node(child_wf, input={"x": "{{ trigger.n }}"})
    definition = flow(sub, transform("after", "{{ nodes.sub.output.double + 1 }}"))
    execution_id = await start(maker, workspace, definition, {"n": 20})
    assert await runner.execute(execution_id) == "completed"
    ex, _ = await state(maker, execution_id)
    assert ex.output == {"after": 41}
    (child,) = await children(maker, execution_id)
    assert (child.status, child.depth, child.parent_node_id) == ("completed", 1, "sub")
    assert child.trigger_data == {"x": 20}
    assert child.output == {"double": 40}
    # A redelivery of the parent's message finds the child, never starts another.
    assert await runner.execute(execution_id) == "not_claimed"
    assert len(await children(maker, execution_id)) == 1


async def test_for_each_and_while_can_run_a_workflow_per_pass(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace
) -> None:
    child_wf = await saved(maker, workspace, flow(transform("sq", "{{ trigger.item ** 2 }}")))
    config = {"kind": "for_each", "items": "trigger.numbers", "workflow_id": str(child_wf)}
    each = {"id": "each", "type": "logic", "config": {**config, "max_concurrency": 3}}
    execution_id = await start(maker, workspace, flow(each), {"numbers": [1, 2, 3, 4]})
    await runner.execute(execution_id)
    ex, _ = await state(maker, execution_id)
    assert ex.status == "completed", ex.error
    _, rows = await state(maker, execution_id)
    assert rows["each"].output == [{"sq": 1}, {"sq": 4}, {"sq": 9}, {"sq": 16}]
    assert len(await children(maker, execution_id)) == 4

    counter = await saved(maker, workspace, flow(transform("next", "{{ trigger.iteration + 1 }}")))
    loop = while_node("iteration < 2", 5, workflow_id=str(counter))
    execution_id = await start(maker, workspace, flow(loop))
    assert await runner.execute(execution_id) == "completed"
    _, rows = await state(maker, execution_id)
    assert rows["loop"].output == {"iterations": 2, "last": {"next": 2}}


async def test_a_failed_child_fails_the_node_and_depth_is_capped(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace
) -> None:
    broken = await saved(maker, workspace, flow(transform("bad", "{{ trigger.missing.deeper }}")))
    sub = sub_node(broken)
    execution_id = await start(maker, workspace, flow(sub))
    assert await runner.execute(execution_id) == "failed"
    _, rows = await state(maker, execution_id)
    (child,) = await children(maker, execution_id)
    assert child.status == "failed"
    assert f"sub-workflow run {child.id} failed" in error_of(rows["sub"])["message"]

    # parent -> middle -> leaf is two levels: over a limit of one, the middle fails.
    leaf = await saved(maker, workspace, flow(transform("v", "1")))
    middle = await saved(maker, workspace, flow(sub_node(leaf, "inner")))
    engine = runner.settings.engine.model_copy(update={"max_sub_workflow_depth": 1})
    settings = runner.settings.model_copy(update={"engine": engine})
    shallow = Runner(settings, maker, runner.http, "shallow", Enqueued())
    sub = sub_node(middle)
    execution_id = await start(maker, workspace, flow(sub))
    assert await shallow.execute(execution_id) == "failed"
    (child,) = await children(maker, execution_id)
    _, child_rows = await state(maker, child.id)
    assert "deeper than 1 levels" in error_of(child_rows["inner"])["message"]
    assert await children(maker, child.id) == []


async def test_cancelling_the_parent_cancels_the_child_promptly(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace, target: Target
) -> None:
    key = uuid.uuid4().hex[:8]
    call = {"kind": "http_request", "url": f"{target.base}/slow/10?n={key}"}
    child_wf = await saved(maker, workspace, flow({"id": "call", "type": "action", "config": call}))
    sub = sub_node(child_wf)
    execution_id = await start(maker, workspace, flow(sub))
    task = asyncio.create_task(runner.execute(execution_id))
    # The child is running once its call is in flight.
    await eventually(lambda: target.query_hits[key] == 1, timeout_s=10, what="the child's call")
    assert len(await children(maker, execution_id)) == 1
    requested = time.monotonic()
    async with UnitOfWork(maker) as uow:
        await uow.session.execute(
            update(WorkflowExecution)
            .where(WorkflowExecution.id == execution_id)
            .values(cancel_requested_at=WorkflowExecution.created_at)
        )
    assert await asyncio.wait_for(task, 5) == "cancelled"
    assert time.monotonic() - requested < 1.5
    (child,) = await children(maker, execution_id)
    assert child.status == "cancelled"
    _, rows = await state(maker, child.id)
    assert rows["call"].status == "cancelled"
