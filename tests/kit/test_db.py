"""The unit of work: commit on success, roll back on error, side effects only after commit."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest
from psycopg.pq import TransactionStatus
from sqlalchemy import delete, func, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.kit.db import UnitOfWork, create_engine, create_sessionmaker, driver_cursor
from backend.kit.errors import NotFound
from backend.kit.repository import Repository
from backend.models import Workspace


class WorkspaceRepository(Repository[Workspace]):
    model = Workspace


async def count(session: AsyncSession, slug: str) -> int:
    return int(await session.scalar(select(func.count()).where(Workspace.slug == slug)) or 0)


async def test_commits_and_then_runs_after_commit_callbacks(
    sessionmaker: async_sessionmaker[AsyncSession], session: AsyncSession
) -> None:
    seen: list[int] = []
    async with UnitOfWork(sessionmaker) as uow:
        uow.session.add(Workspace(name="A", slug="uow-a"))
        uow.after_commit(lambda: seen.append(1))

        async def later() -> None:
            seen.append(2)

        uow.after_commit(later)
        assert seen == []  # nothing runs before the commit
    assert seen == [1, 2]
    assert await count(session, "uow-a") == 1


async def test_rolls_back_and_drops_side_effects_on_error(
    sessionmaker: async_sessionmaker[AsyncSession], session: AsyncSession
) -> None:
    seen: list[str] = []
    with pytest.raises(RuntimeError):
        async with UnitOfWork(sessionmaker) as uow:
            uow.session.add(Workspace(name="B", slug="uow-b"))
            await uow.session.flush()
            uow.after_commit(lambda: seen.append("enqueued"))
            raise RuntimeError("boom")
    assert seen == []
    assert await count(session, "uow-b") == 0


async def test_a_failing_side_effect_does_not_undo_the_commit(
    sessionmaker: async_sessionmaker[AsyncSession], session: AsyncSession
) -> None:
    seen: list[str] = []

    def broken() -> None:
        raise ConnectionError("broker down")

    async with UnitOfWork(sessionmaker) as uow:
        uow.session.add(Workspace(name="C", slug="uow-c"))
        uow.after_commit(broken)
        uow.after_commit(lambda: seen.append("next one still runs"))
    assert seen == ["next one still runs"]
    assert await count(session, "uow-c") == 1


async def test_repository_paginates_and_counts(session: AsyncSession) -> None:
    repo = WorkspaceRepository(session)
    for i in range(5):
        await repo.add(Workspace(name=f"P{i}", slug=f"page-{i}"))
    stmt = repo.select().where(Workspace.slug.like("page-%")).order_by(Workspace.slug)
    items, total = await repo.paginate(stmt, limit=2, offset=2)
    assert total == 5
    assert [w.slug for w in items] == ["page-2", "page-3"]


async def test_records_get_uuid_keys_and_aware_timestamps(session: AsyncSession) -> None:
    ws = await WorkspaceRepository(session).add(Workspace(name="T", slug="times"))
    await session.refresh(ws)
    assert ws.id.version == 4
    assert ws.created_at.tzinfo is not None
    assert ws.settings == {}


async def test_get_or_404_raises_not_found(session: AsyncSession) -> None:
    import uuid

    with pytest.raises(NotFound):
        await WorkspaceRepository(session).get_or_404(uuid.uuid4())


@pytest.mark.parametrize(
    "pre_ping", [True, False], ids=["pre-ping-when-idle", "worker-no-pre-ping"]
)
async def test_a_connection_postgresql_dropped_fails_once_and_is_never_handed_out_again(
    settings: Settings, engine: AsyncEngine, pre_ping: bool
) -> None:
    """Statements sent straight through the driver (the engine's claim, checkpoints,
    close; hot API reads) on connections a PostgreSQL restart dropped: the first fails
    as SQLAlchemy's OperationalError marked `connection_invalidated` (the caller's cue to
    go again), and no other dead connection is handed out after it, although they
    were all used a moment ago (too recently for the idle pre-ping). Before, the dead
    connection went back to the autocommit pool and failed every claim it was given."""
    hot = settings.db.model_copy(
        update={"pool_size": 3, "max_overflow": 0, "pool_pre_ping": pre_ping}
    )
    pool = create_engine(settings.model_copy(update={"db": hot}), autocommit=True)

    async def backend_pid(conn: AsyncConnection) -> int:
        async with driver_cursor(conn) as cur:
            await cur.execute("SELECT pg_backend_pid()")
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

    try:
        conns = [await pool.connect() for _ in range(3)]
        pids = [await backend_pid(c) for c in conns]
        for c in conns:
            await c.close()
        async with engine.connect() as admin:
            for pid in pids:
                await admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        with pytest.raises(OperationalError) as raised:
            async with pool.connect() as conn:
                await backend_pid(conn)
        assert raised.value.connection_invalidated
        # Every later checkout is a live connection (three in a row: the pool's size).
        fresh = set()
        for _ in range(3):
            async with pool.connect() as conn:
                fresh.add(await backend_pid(conn))
        assert fresh and not fresh & set(pids)
    finally:
        await pool.dispose()


async def test_driver_errors_come_back_as_sqlalchemy_raises_them(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        with pytest.raises(DBAPIError) as raised:
            async with driver_cursor(conn) as cur:
                await cur.execute("SELECT 1/0")
        assert not raised.value.connection_invalidated
        assert "division by zero" in str(raised.value)


async def test_a_statement_cancelled_midway_leaves_no_busy_connection_in_the_pool(
    settings: Settings,
) -> None:
    """A task cancelled while its statement runs (a timeout, a worker shutting down):
    the connection is not handed out busy; the next statement on the pool answers."""
    hot = settings.db.model_copy(update={"pool_size": 1, "max_overflow": 0})
    pool = create_engine(settings.model_copy(update={"db": hot}), autocommit=True)

    async def sleep_on(conn: AsyncConnection) -> None:
        async with driver_cursor(conn) as cur:
            await cur.execute("SELECT pg_sleep(5)")

    try:
        async with pool.connect() as conn:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(sleep_on(conn), 0.3)
        async with pool.connect() as conn, driver_cursor(conn) as cur:
            await asyncio.wait_for(cur.execute("SELECT 1"), 2)
            assert await cur.fetchone() == (1,)
    finally:
        await pool.dispose()


async def test_a_read_only_unit_skips_the_commit_but_still_writes_what_it_changed(
    engine: AsyncEngine,
) -> None:
    """A read-only unit (the hot GETs) on the engine runs in autocommit and, with
    nothing pending, skips the session's commit; a change that slipped in (the
    sign-in activity stamp) is still written, and the connection goes back idle."""
    makers = create_sessionmaker(engine)
    slug = f"ro-{uuid.uuid4().hex[:8]}"
    async with UnitOfWork(makers) as uow:
        uow.session.add(Workspace(name="before", slug=slug))
    try:
        async with UnitOfWork(makers, read_only=True) as uow:
            row = (
                await uow.session.execute(select(Workspace).where(Workspace.slug == slug))
            ).scalar_one()
            connection = await uow.session.connection()
            driver = (await connection.get_raw_connection()).driver_connection
            row.name = "after"
        async with UnitOfWork(makers, read_only=True) as uow:
            name = await uow.session.scalar(select(Workspace.name).where(Workspace.slug == slug))
        assert name == "after"
        assert driver is not None
        assert driver.info.transaction_status == TransactionStatus.IDLE
    finally:
        async with UnitOfWork(makers) as uow:
            await uow.session.execute(delete(Workspace).where(Workspace.slug == slug))


async def test_on_rollback_runs_only_when_the_writes_did_not_commit(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    undone: list[str] = []

    def undo(name: str) -> Callable[[], None]:
        return lambda: undone.append(name)

    async with UnitOfWork(sessionmaker) as uow:
        uow.on_rollback(undo("committed"))
    with pytest.raises(RuntimeError):
        async with UnitOfWork(sessionmaker) as uow:
            uow.on_rollback(undo("rolled back"))
            raise RuntimeError("boom")
    # A commit that fails is undone too (a duplicate slug: the unique index refuses it
    # at the commit's flush).
    async with UnitOfWork(sessionmaker) as uow:
        uow.session.add(Workspace(name="D", slug="uow-d"))
    with pytest.raises(IntegrityError):
        async with UnitOfWork(sessionmaker) as uow:
            uow.on_rollback(undo("commit failed"))
            uow.session.add(Workspace(name="D again", slug="uow-d"))
    # What an explicit commit made durable stays, whatever happens after it.
    with pytest.raises(RuntimeError):
        async with UnitOfWork(sessionmaker) as uow:
            uow.on_rollback(undo("committed early"))
            await uow.commit()
            raise RuntimeError("after the commit")
    assert undone == ["rolled back", "commit failed"]
