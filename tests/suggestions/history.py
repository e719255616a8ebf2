"""Run history written straight into the tables, as finished runs leave it: a run row
and one checkpoint per node, for the rules to read."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from backend.models import NodeExecution
from tests.support.factories import WorkflowExecutionFactory, create


def ok(ms: float = 50.0, **extra: Any) -> dict[str, Any]:
    return {"status": "completed", "duration_ms": ms, **extra}


def failed(cls: str, ms: float = 50.0) -> dict[str, Any]:
    return {"status": "failed", "duration_ms": ms, "error": {"message": "x", "class": cls}}


async def add_run(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    workflow_id: uuid.UUID,
    nodes: dict[str, dict[str, Any]],
    *,
    version: int = 1,
    age: timedelta = timedelta(hours=1),
) -> uuid.UUID:
    """A finished run (failed if a node failed) with `nodes`' checkpoints."""
    at = datetime.now(UTC) - age
    run = await create(
        session,
        WorkflowExecutionFactory,
        workspace_id=workspace_id,
        workflow_id=workflow_id,
        version=version,
        status="failed" if any(n["status"] == "failed" for n in nodes.values()) else "completed",
        created_at=at,
        started_at=at,
        finished_at=at + timedelta(seconds=1),
        cost_usd=sum(float(n.get("cost_usd", 0)) for n in nodes.values()),
    )
    for node_id, fields in nodes.items():
        session.add(
            NodeExecution(
                execution_id=run.id,
                node_id=node_id,
                started_at=at,
                finished_at=at + timedelta(milliseconds=fields.get("duration_ms") or 0),
                attempt=1,
                **fields,
            )
        )
    await session.flush()
    return run.id
