"""A run's row and its first history entry in one statement (backend/executions/
admission.py, issue 20): what the ORM path wrote, it writes; a duplicate key writes
nothing; the run is the session's own object."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from backend.executions import admission, lifecycle
from backend.kit.db import UnitOfWork
from backend.models import ExecutionTransition, WorkflowExecution
from tests.support.factories import WorkflowFactory, WorkspaceFactory, create


async def _workflow(session: AsyncSession) -> Any:
    ws = await create(session, WorkspaceFactory, name="Admission")
    return await create(session, WorkflowFactory, workspace_id=ws.id, name="w")


async def test_one_statement_writes_the_run_and_its_history(
    sessionmaker: async_sessionmaker[AsyncSession], engine: AsyncEngine
) -> None:
    statements: list[str] = []
    async with UnitOfWork(sessionmaker) as uow:
        wf = await _workflow(uow.session)

        def count(*args: Any) -> None:
            statements.append(str(args[2]))

        event.listen(engine.sync_engine, "before_cursor_execute", count)
        try:
            run = await lifecycle.create_run(
                uow,
                workspace_id=wf.workspace_id,
                workflow_id=wf.id,
                version=1,
                trigger_type="manual",
                trigger_data={"n": [1, 2], "s": "x"},
                actor="user:someone",
                reason="started (manual)",
                enqueue=False,
                idempotency_key="k-1",
                skip_duplicate=True,
            )
        finally:
            event.remove(engine.sync_engine, "before_cursor_execute", count)
        assert run is not None
        # One statement writes the run and its history together (the other one, if any,
        # is the quota check reading the workspace's limits).
        written = [s for s in statements if "INSERT" in s]
        assert len(written) == 1
        assert "workflow_executions" in written[0] and "execution_transitions" in written[0]
        assert len(statements) <= 2
        # The session's own persistent object, with the server's defaults filled in.
        assert run in uow.session
        assert await uow.session.get(WorkflowExecution, run.id) is run
        assert run.status == "pending"
        assert run.trigger_data == {"n": [1, 2], "s": "x"}
        assert run.variables == {} and run.depth == 0 and run.deliveries == 0
        assert run.created_at is not None and run.idempotency_key == "k-1"
        history = (
            await uow.session.scalars(
                select(ExecutionTransition).where(ExecutionTransition.execution_id == run.id)
            )
        ).all()
        assert [(h.from_status, h.to_status, h.actor, h.reason, h.node_id, h.iteration)
                for h in history] == [(None, "pending", "user:someone", "started (manual)",
                                       None, 0)]  # fmt: skip
        # Read back from the database, not the identity map: the JSON went in as JSON.
        stored = await uow.session.execute(
            select(WorkflowExecution.trigger_data, WorkflowExecution.status).where(
                WorkflowExecution.id == run.id
            )
        )
        assert stored.one() == ({"n": [1, 2], "s": "x"}, "pending")


async def test_a_duplicate_key_writes_neither_row(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    async with UnitOfWork(sessionmaker) as uow:
        wf = await _workflow(uow.session)
        runs = [
            await lifecycle.create_run(
                uow,
                workspace_id=wf.workspace_id,
                workflow_id=wf.id,
                version=1,
                trigger_type="manual",
                trigger_data={},
                actor="user:someone",
                enqueue=False,
                idempotency_key="same",
                skip_duplicate=True,
            )
            for _ in range(2)
        ]
        assert runs[0] is not None and runs[1] is None
        written = await uow.session.scalar(
            select(func.count())
            .select_from(ExecutionTransition)
            .join(WorkflowExecution, WorkflowExecution.id == ExecutionTransition.execution_id)
            .where(WorkflowExecution.workflow_id == wf.id)
        )
        runs_written = await uow.session.scalar(
            select(func.count()).where(WorkflowExecution.workflow_id == wf.id)
        )
        assert (written, runs_written) == (1, 1)


async def test_an_unknown_column_is_refused_before_any_sql(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    async with UnitOfWork(sessionmaker) as uow:
        with pytest.raises(ValueError, match="not columns"):
            await admission.insert_run(
                uow.session,
                {"id": uuid.uuid4(), "status; DROP TABLE x": "pending"},
                skip_duplicate=False,
                status="pending",
                at=datetime.now(UTC),
                actor=None,
                reason=None,
            )


async def test_the_returned_run_is_tracked_like_a_loaded_row(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    # Built without its constructor: a change to it is still seen and flushed, and
    # attributes nobody changed are not written back.
    async with UnitOfWork(sessionmaker) as uow:
        wf = await _workflow(uow.session)
        run = await lifecycle.create_run(
            uow,
            workspace_id=wf.workspace_id,
            workflow_id=wf.id,
            version=1,
            trigger_type="manual",
            trigger_data={"a": 1},
            actor=None,
            enqueue=False,
        )
        assert run is not None
        assert not uow.session.dirty and run not in uow.session.new
        run.status = "cancelled"
        assert run in uow.session.dirty
        await uow.session.flush()
        stored = await uow.session.execute(
            select(WorkflowExecution.status, WorkflowExecution.trigger_data).where(
                WorkflowExecution.id == run.id
            )
        )
        assert stored.one() == ("cancelled", {"a": 1})
