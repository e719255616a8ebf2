"""What the engine's hot path does not do: the runs of one version that start together
load and validate it (and read its settings) once, not once each; and a run nobody
listens to ends without the trigger hooks' query (its closing statement answers it)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.kit.db import UnitOfWork
from backend.models import WorkflowExecution, Workspace
from tests.support.definitions import chain
from tests.support.engine import start, state
from tests.support.factories import WorkflowExecutionFactory, create
from workers.engine.runner import Runner

pytestmark = pytest.mark.xdist_group("engine")


@contextmanager
def statements(maker: async_sessionmaker[AsyncSession]) -> Iterator[list[str]]:
    """Every SQL statement sent through `maker`'s engine while the block runs."""
    engine = maker.kw["bind"].sync_engine
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, sql: str, *_: Any) -> None:
        seen.append(sql)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


async def _more_runs(
    maker: async_sessionmaker[AsyncSession], first: uuid.UUID, count: int
) -> list[uuid.UUID]:
    async with UnitOfWork(maker) as uow:
        ex = await uow.session.get(WorkflowExecution, first)
        assert ex is not None
        runs = [first]
        for i in range(count):
            run = await create(
                uow.session,
                WorkflowExecutionFactory,
                workspace_id=ex.workspace_id,
                workflow_id=ex.workflow_id,
                trigger_data={"x": i},
            )
            runs.append(run.id)
        return runs


async def test_runs_of_a_new_version_starting_together_load_it_once(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace
) -> None:
    first = await start(maker, workspace, chain(3), {"x": 0})
    ids = await _more_runs(maker, first, 11)
    with statements(maker) as seen:
        outcomes = await asyncio.gather(*(runner.execute(i) for i in ids))
    assert outcomes == ["completed"] * 12
    # One read of the version's graph (to validate it) and one of its settings (for the
    # notifications at the close), not one of each per run.
    graphs = [s for s in seen if s.startswith("SELECT workflow_versions.definition \n")]
    settings = [s for s in seen if s.startswith("SELECT workflow_versions.definition[")]
    assert (len(graphs), len(settings)) == (1, 1), "\n---\n".join(seen)
    for i in ids:
        ex, _ = await state(maker, i)
        assert ex.status == "completed"


async def test_a_run_without_listeners_ends_without_the_listener_query(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace
) -> None:
    execution_id = await start(maker, workspace, chain(2), {"x": 1})
    with statements(maker) as seen:
        assert await runner.execute(execution_id) == "completed"
    # The closing statement (sent on the driver's cursor, not seen here) asked; nothing
    # else did. Runs with listeners still start them: tests/triggers.
    assert seen, "no statement seen: the listener does not watch this engine"
    assert not [s for s in seen if "FROM triggers" in s]
