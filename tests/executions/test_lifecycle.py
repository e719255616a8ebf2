"""The lifecycle owns every status change: illegal transitions are refused (by the state
machine, by the lifecycle before it writes, by the database's CHECK), nothing else in
the code assigns a status, every change lands in the run's history, and a caller can
wait for a run's end over HTTP."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from itertools import product
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.executions import lifecycle
from backend.executions.lifecycle import NodeChange
from backend.executions.state import (
    EXECUTION_TRANSITIONS,
    NODE_TRANSITIONS,
    ExecutionStatus,
    NodeStatus,
    transition,
)
from backend.kit.db import UnitOfWork
from backend.kit.errors import InvalidTransition
from backend.models import WorkflowExecution
from tests.support.crossprocess import workflow
from tests.support.definitions import chain
from tests.support.factories import WorkflowFactory, WorkspaceFactory, create

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 1, 1, tzinfo=UTC)

ILLEGAL_RUN = [
    (old, new)
    for old, new in product(ExecutionStatus, ExecutionStatus)
    if old != new and new not in EXECUTION_TRANSITIONS[old]
]
ILLEGAL_NODE = [
    (old, new)
    for old, new in product(NodeStatus, NodeStatus)
    if old != new and new not in NODE_TRANSITIONS[old]
]


@pytest.mark.parametrize(("old", "new"), ILLEGAL_RUN)
def test_every_illegal_run_transition_is_refused(old: str, new: str) -> None:
    with pytest.raises(InvalidTransition):
        transition("execution", old, new, at=NOW)


@pytest.mark.parametrize(("old", "new"), ILLEGAL_NODE)
def test_every_illegal_node_transition_is_refused(old: str, new: str) -> None:
    with pytest.raises(InvalidTransition):
        transition("node", old, new, at=NOW)


def test_the_tables_leave_something_to_refuse() -> None:
    # Terminal states go nowhere; a run never goes back to pending from the end.
    assert len(ILLEGAL_RUN) == 13 and len(ILLEGAL_NODE) >= 30


# The forms a status assignment takes in this code base: an attribute, a keyword in
# an insert/update, a key of a checkpoint's values, a `status=...` in SQL text.
ASSIGNMENT = re.compile(
    r"(\.status\s*=(?!=))|(\bstatus\s*=\s*(E|N|ExecutionStatus|NodeStatus)\.)"
    r"|([\"']status[\"']\s*:\s*(E|N|ExecutionStatus|NodeStatus)\.)|(SET\s+status\s*=)",
)
# Statuses of other state machines (workflows: draft/published; notification deliveries).
OTHER_MACHINES = {
    "backend/workflows/service.py",
    "workers/tasks/triggers.py",
}
# A module can only assign a run's or a node's status if it can name one of them; other
# domains' state machines (tools, tasks, deliveries) are not this test's business.
NAMES_RUNS = re.compile(
    r"WorkflowExecution|NodeExecution|workflow_executions|node_executions"
    r"|ExecutionStatus|NodeStatus"
)


def test_no_status_is_assigned_outside_the_lifecycle() -> None:
    owners = {"backend/executions/lifecycle.py", "backend/executions/repository.py"}
    found = []
    for path in [*ROOT.glob("backend/**/*.py"), *ROOT.glob("workers/**/*.py")]:
        rel = path.relative_to(ROOT).as_posix()
        source = path.read_text()
        if rel in owners or rel in OTHER_MACHINES or not NAMES_RUNS.search(source):
            continue
        for number, line in enumerate(source.splitlines(), 1):
            if ASSIGNMENT.search(line):
                found.append(f"{rel}:{number}: {line.strip()}")
    assert found == []
    # The repository writes only the status the lifecycle passes in.
    repository = (ROOT / "backend/executions/repository.py").read_text()
    assert not re.search(r"status\s*=\s*(E|N)\.", repository)


async def _pending_run(maker: async_sessionmaker[AsyncSession]) -> uuid.UUID:
    async with UnitOfWork(maker) as uow:
        ws = await create(uow.session, WorkspaceFactory, name="Lifecycle")
        wf = await create(uow.session, WorkflowFactory, workspace_id=ws.id, name="w")
        run = await lifecycle.create_run(
            uow,
            workspace_id=ws.id,
            workflow_id=wf.id,
            version=1,
            trigger_type="manual",
            trigger_data={},
            actor="test",
            enqueue=False,
        )
        assert run is not None
        return run.id


async def test_the_lifecycle_refuses_an_illegal_node_change_before_writing(
    maker: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    run_id = await _pending_run(maker)
    claim = await lifecycle.claim(maker, run_id, worker_id="t", settings=settings)
    assert claim is not None
    done = NodeChange("a", NodeStatus.RUNNING, NodeStatus.COMPLETED, {"output": 1})
    await lifecycle.record_nodes(maker, claim, [done])
    for old, to in [(NodeStatus.COMPLETED, NodeStatus.RUNNING), (None, NodeStatus.RETRYING)]:
        with pytest.raises(InvalidTransition):
            await lifecycle.record_nodes(maker, claim, [NodeChange("b", old, to, {})])
    # A finished run cannot be closed again, and its history shows each real change.
    assert await lifecycle.close(maker, claim, ExecutionStatus.COMPLETED) is not None
    assert await lifecycle.close(maker, claim, ExecutionStatus.FAILED) is None
    async with maker() as session:
        rows = await lifecycle.history(session, run_id)
    assert [(r.node_id, r.from_status, r.to_status) for r in rows] == [
        (None, None, "pending"),
        (None, "pending", "running"),
        ("a", "running", "completed"),
        (None, "running", "completed"),
    ]
    assert rows[1].actor == claim.token and rows[1].reason == "claimed"


async def test_the_database_refuses_a_status_no_state_machine_knows(
    maker: async_sessionmaker[AsyncSession],
) -> None:
    run_id = await _pending_run(maker)
    for sql in (
        "UPDATE workflow_executions SET status = 'paused' WHERE id = :id",
        "INSERT INTO node_executions (id, execution_id, node_id, iteration, status) "
        "VALUES (gen_random_uuid(), :id, 'x', 0, 'done')",
    ):
        async with maker() as session:
            with pytest.raises(IntegrityError, match="ck_"):
                await session.execute(text(sql), {"id": run_id})


async def test_a_stale_lease_goes_back_to_pending_with_its_reason(
    maker: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    run_id = await _pending_run(maker)
    claim = await lifecycle.claim(maker, run_id, worker_id="dead", settings=settings)
    assert claim is not None
    async with maker() as session:
        await session.execute(
            text("UPDATE workflow_executions SET lease_expires_at = now() - interval '1 s' "
                 "WHERE id = :id"),
            {"id": run_id},
        )  # fmt: skip
        await session.commit()
    requeue, _ = await lifecycle.reap(maker, settings)
    assert run_id in requeue
    async with maker() as session:
        run = await session.get(WorkflowExecution, run_id)
        rows = await lifecycle.history(session, run_id)
    assert run is not None and run.status == "pending" and run.lease_owner is None
    last = rows[-1]
    assert (last.from_status, last.to_status, last.actor) == ("running", "pending", "reaper")
    assert last.reason == f"lease of {claim.token} expired"


# Through the API, with a real worker ---------------------------------------------------------


@pytest.mark.xdist_group("crossprocess")
@pytest.mark.usefixtures("worker_name")
def test_wait_answers_the_finished_run_and_history_shows_every_change(
    api: str, owner: dict[str, str]
) -> None:
    wf = workflow(api, owner, chain(3))
    r = httpx.post(
        f"{api}/api/v1/executions",
        headers=owner,
        params={"wait": 20},
        json={"workflow_id": wf, "trigger_data": {"x": 1}},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    done = r.json()
    assert (done["status"], done["output"]) == ("completed", {"n2": 4})
    history = httpx.get(
        f"{api}/api/v1/executions/{done['id']}/history", headers=owner, timeout=10
    ).json()
    runs = [(h["from_status"], h["to_status"]) for h in history if h["node_id"] is None]
    assert runs == [(None, "pending"), ("pending", "running"), ("running", "completed")]
    assert history[0]["actor"].startswith("user:")
    nodes = {h["node_id"]: h["to_status"] for h in history if h["node_id"]}
    assert nodes == {"start": "completed", "n0": "completed", "n1": "completed", "n2": "completed"}


@pytest.mark.xdist_group("crossprocess")
@pytest.mark.usefixtures("worker_name")
def test_wait_that_runs_out_answers_202_and_the_run_goes_on(
    api: str, owner: dict[str, str]
) -> None:
    from tests.support.target import http_target

    with http_target() as target:
        slow = {
            "nodes": [
                {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
                {
                    "id": "wait",
                    "type": "action",
                    "config": {"kind": "http_request", "url": f"{target.base}/slow/3"},
                },
            ],
            "connections": [{"source": "start", "target": "wait"}],
        }
        wf = workflow(api, owner, slow)
        r = httpx.post(
            f"{api}/api/v1/executions",
            headers=owner,
            params={"wait": 0.5},
            json={"workflow_id": wf},
            timeout=30,
        )
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "pending"
        bad = httpx.post(
            f"{api}/api/v1/executions",
            headers=owner,
            params={"wait": -1},
            json={"workflow_id": wf},
            timeout=30,
        )
        assert bad.status_code == 422
