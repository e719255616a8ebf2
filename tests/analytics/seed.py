"""A month of runs with node rows, written straight into the test's session: known
statuses, durations, queue waits, retries, models, agents and costs, so every figure
the analytics API answers can be checked against what was put in."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from backend.models import Agent, NodeExecution, Workflow, WorkflowExecution, Workspace
from tests.support.factories import AgentFactory, create, create_workflow


def definition(agent_id: uuid.UUID) -> dict[str, Any]:
    return {
        "nodes": [
            {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
            {"id": "think", "type": "agent", "config": {"agent_id": str(agent_id), "prompt": "hi"}},
            {
                "id": "fetch",
                "type": "action",
                "config": {"kind": "http_request", "url": "https://x"},
            },
        ],
        "connections": [
            {"source": "start", "target": "think"},
            {"source": "think", "target": "fetch"},
        ],
        "settings": {},
    }


@dataclass
class Seeded:
    workspace: Workspace
    workflow: Workflow
    other: Workflow
    agent: Agent
    start: datetime
    runs: list[WorkflowExecution] = field(default_factory=list)
    by_status: dict[str, int] = field(default_factory=dict)
    cost: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    durations: list[float] = field(default_factory=list)
    fetch_failures: int = 0


async def add_run(
    session: AsyncSession,
    s: Seeded,
    workflow: Workflow,
    created: datetime,
    status: str,
    duration_ms: float | None,
    *,
    wait_ms: float = 200.0,
    fetch_error: str | None = None,
) -> WorkflowExecution:
    ended = status in ("completed", "failed", "cancelled")
    run = WorkflowExecution(
        id=uuid.uuid4(),
        workspace_id=s.workspace.id,
        workflow_id=workflow.id,
        version=1,
        status=status,
        trigger_type="manual",
        created_at=created,
        started_at=created + timedelta(milliseconds=wait_ms) if status != "pending" else None,
        finished_at=created + timedelta(milliseconds=wait_ms + (duration_ms or 0))
        if ended
        else None,
        duration_ms=duration_ms if ended else None,
        input_tokens=100,
        output_tokens=50,
        cost_usd=0.01,
    )
    session.add(run)
    await session.flush()
    nodes = [
        NodeExecution(
            execution_id=run.id, node_id="start", status="completed", attempt=1, duration_ms=1.0
        ),
        NodeExecution(
            execution_id=run.id,
            node_id="think",
            status="completed",
            attempt=2,  # one retry
            duration_ms=(duration_ms or 10) / 2,
            input_tokens=100,
            output_tokens=50,
            cost_usd=0.01,
            output={
                "text": "ok",
                "model": "claude-sonnet-5-5",
                "usage": {"cache_read_input_tokens": 7, "cache_creation_input_tokens": 3},
            },
        ),
        NodeExecution(
            execution_id=run.id,
            node_id="fetch",
            status="failed" if fetch_error else "completed",
            attempt=1,
            duration_ms=5.0,
            error={"message": "boom", "class": fetch_error, "attempt": 1} if fetch_error else None,
        ),
    ]
    session.add_all(nodes)
    await session.flush()
    s.runs.append(run)
    s.by_status[status] = s.by_status.get(status, 0) + 1
    s.cost += 0.01
    s.input_tokens += 100
    s.output_tokens += 50
    if ended and duration_ms is not None:
        s.durations.append(duration_ms)
    if fetch_error:
        s.fetch_failures += 1
    return run


async def seed_month(session: AsyncSession, workspace: Workspace, now: datetime) -> Seeded:
    """Four runs a day for 30 days: completed, completed, failed (fetch: transient),
    cancelled; durations 100..400 ms; all in `workflow` but one a day in `other`."""
    agent = await create(session, AgentFactory, workspace_id=workspace.id, name="Writer")
    workflow = await create_workflow(session, workspace.id, definition(agent.id), name="Main")
    other = await create_workflow(session, workspace.id, definition(agent.id), name="Other")
    start = (now - timedelta(days=30)).replace(minute=0, second=0, microsecond=0)
    s = Seeded(workspace, workflow, other, agent, start)
    for day in range(30):
        at = start + timedelta(days=day, hours=1)
        await add_run(session, s, workflow, at, "completed", 100.0)
        await add_run(session, s, workflow, at + timedelta(minutes=1), "completed", 200.0)
        await add_run(
            session,
            s,
            workflow,
            at + timedelta(minutes=2),
            "failed",
            300.0,
            fetch_error="transient",
        )
        await add_run(session, s, other, at + timedelta(minutes=3), "cancelled", 400.0)
    return s


def utc(at: datetime) -> datetime:
    return at.astimezone(UTC)
