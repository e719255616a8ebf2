"""What the engine's hot path does not do: the runs of one version that start together
load and validate it once (and never read its settings again), not once each; and a run nobody
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

from backend.config import Settings
from backend.kit.db import UnitOfWork, create_engine, create_sessionmaker
from backend.kit.http_guard import guarded_client
from backend.models import WorkflowExecution, Workspace
from tests.support.definitions import chain
from tests.support.engine import Enqueued, loopback_settings, start, state
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
    # One read of the version's graph (to validate it), and none of its settings for the
    # notifications at the close (the validated graph has them): not one of each per run.
    graphs = [s for s in seen if s.startswith("SELECT workflow_versions.definition \n")]
    settings = [s for s in seen if s.startswith("SELECT workflow_versions.definition[")]
    assert (len(graphs), len(settings)) == (1, 0), "\n---\n".join(seen)
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


async def test_a_burst_on_a_small_pool_completes_without_waiting_for_connections(
    settings: Settings, workspace: Workspace, maker: async_sessionmaker[AsyncSession]
) -> None:
    # Every closing run holds a pooled connection while its finished-hooks run: nothing
    # those hooks wait for may need another connection from the same pool (a shared
    # read of a new version's settings did, and a burst of 20 deadlocked a pool of 20).
    db = settings.db.model_copy(update={"pool_size": 2, "max_overflow": 0, "pool_timeout_s": 3})
    engine = create_engine(settings.model_copy(update={"db": db}))
    small = create_sessionmaker(engine)
    first = await start(maker, workspace, chain(2), {"x": 0})
    ids = await _more_runs(maker, first, 7)
    try:
        async with guarded_client(["127.0.0.1/32"]) as http:
            runner = Runner(loopback_settings(settings), small, http, "small-pool", Enqueued())
            outcomes = await asyncio.gather(*(runner.execute(i) for i in ids))
    finally:
        await engine.dispose()
    assert outcomes == ["completed"] * 8
