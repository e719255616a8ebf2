"""Database access: the async engine, and the unit of work every request and task runs in.

A unit of work commits once at the end when nothing raised and rolls back otherwise.
Side effects that must only happen for committed state (enqueueing a task, publishing
an event) are registered with `after_commit` and run after the commit succeeded; a
rolled-back unit of work sends nothing.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Self, TypeVar

import psycopg
from fastapi import Depends, Request
from psycopg.pq import TransactionStatus
from psycopg.rows import AsyncRowFactory
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import Pool

from backend.config import Settings
from backend.kit.errors import DomainError
from backend.kit.logging import get_logger

log = get_logger(__name__)

AfterCommit = Callable[[], Awaitable[Any] | Any]


def create_engine(
    settings: Settings, *, autocommit: bool = False, keep_connections: bool = False
) -> AsyncEngine:
    """The application's engine; with `autocommit`, one whose connections are opened in
    autocommit and stay so (for single statements that are atomic on their own: nothing
    is switched on checkout and back on checkin, nothing rolled back on return).

    With `keep_connections` (the API), the pool keeps every connection it opens, up to
    the same ceiling (DB__POOL_SIZE + DB__MAX_OVERFLOW), instead of closing the overflow
    as it comes back: under load the in-flight count swings around DB__POOL_SIZE, and
    each swing closed a connection and opened a new one (a PostgreSQL backend started
    and torn down, and on the API side ~6 % of a read's CPU, measured under wrk)."""
    idle_s = settings.db.pre_ping_idle_s
    options: dict[str, Any] = (
        {"isolation_level": "AUTOCOMMIT", "pool_reset_on_return": None} if autocommit else {}
    )
    pool_size, max_overflow = settings.db.pool_size, settings.db.max_overflow
    if keep_connections:
        pool_size, max_overflow = pool_size + max_overflow, 0
    engine = create_async_engine(
        settings.database_url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=settings.db.pool_timeout_s,
        # A connection dropped by a PostgreSQL restart is replaced, not handed out.
        pool_pre_ping=settings.db.pool_pre_ping and idle_s <= 0,
        echo=settings.db.echo,
        connect_args={
            "options": f"-c statement_timeout={settings.db.statement_timeout_ms}",
            "application_name": settings.app_name[:60],
        },
        **options,
    )
    if settings.db.pool_pre_ping and idle_s > 0:
        _ping_when_idle(engine.sync_engine, idle_s)
    elif not settings.db.pool_pre_ping:
        # No pre-ping (the worker's hot path), except once for each connection older than
        # a drop a statement ran into (driver_cursor): after a PostgreSQL restart the
        # retry of that statement must not get the next dead connection, and the next.
        _ping_when_idle(engine.sync_engine, math.inf)
    return engine


# When a statement sent straight through the driver found its connection dropped (see
# driver_cursor), per pool: every connection checked in before then is pinged at its
# next checkout, however briefly it sat idle.
_dropped_at: weakref.WeakKeyDictionary[Pool, float] = weakref.WeakKeyDictionary()


def _ping_when_idle(engine: Engine, idle_s: float) -> None:
    """Pre-ping, but only connections that sat in the pool `idle_s` or longer: under load
    a connection comes back within milliseconds of its last statement, and a ping per
    checkout was a round trip on every request. A PostgreSQL restart is still caught for
    every connection that waited out the restart in the pool; one used right up to it
    fails one statement, and then every older connection is pinged (or, for statements
    SQLAlchemy executed, invalidated) before it is handed out again."""
    pool = engine.pool  # dispose() replaces it; the listeners move to the new one

    @event.listens_for(pool, "connect")
    def opened(_: Any, record: Any) -> None:
        record.info["idle_since"] = record.info["out_at"] = time.monotonic()

    @event.listens_for(pool, "checkin")
    def stamp(_: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(pool, "checkout")
    def ping(dbapi_connection: Any, record: Any, _: Any) -> None:
        now = time.monotonic()
        since = record.info.get("idle_since")
        # Handed out last before a drop was seen: it may be dead, however recently it
        # came back (a connection out during the restart returns without a statement).
        handed_out = record.info.get("out_at", 0.0)
        if (
            since is not None
            and now - since < idle_s
            and handed_out > _dropped_at.get(engine.pool, 0.0)
        ):
            record.info["out_at"] = now
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # The pool discards this connection and checks out (or opens) another.
            raise DisconnectionError("stale pooled connection") from exc
        record.info["out_at"] = now


@contextlib.asynccontextmanager
async def driver_cursor(
    conn: AsyncConnection, row_factory: AsyncRowFactory[Any] | None = None
) -> AsyncIterator[psycopg.AsyncCursor[Any]]:
    """A cursor on the pooled connection's psycopg connection itself (for statements
    whose SQLAlchemy execution costs more CPU than their round trip), with errors as
    SQLAlchemy raises them: a `DBAPIError` subclass (OperationalError, IntegrityError...)
    wrapping psycopg's. A connection PostgreSQL dropped (a restart, a failover) is
    invalidated, the error says `connection_invalidated`, and the pool pings the rest
    before reuse: without this the dead connection went back to the pool (an autocommit
    pool resets nothing on return) and failed every statement it was given again, for
    as long as load kept it from idling into the pre-ping (40 s of failed claims after a
    restart in the fault suite)."""
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    assert isinstance(driver, psycopg.AsyncConnection)
    try:
        async with driver.cursor(row_factory=row_factory) as cursor:  # type: ignore[arg-type]
            yield cursor
    except psycopg.Error as exc:
        dropped = driver.closed or driver.broken
        if dropped:
            _dropped_at[conn.sync_engine.pool] = time.monotonic()
            await conn.invalidate(exc)
        raise DBAPIError.instance(
            None, None, exc, psycopg.Error, hide_parameters=True, connection_invalidated=dropped
        ) from exc
    except BaseException as exc:
        # Cancelled (or timed out) mid-statement: psycopg tries to cancel the query on
        # the server and may have closed the connection, or left it busy. As SQLAlchemy
        # does for its own statements, such a connection is not handed out again.
        if not isinstance(exc, Exception) and (
            driver.closed or driver.info.transaction_status in _BUSY
        ):
            await conn.invalidate(exc)
        raise


_BUSY = (TransactionStatus.ACTIVE, TransactionStatus.UNKNOWN)


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # expire_on_commit=False: objects stay readable after commit, so a route can
    # serialise what it just saved without another round trip.
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


_autocommit_engines: weakref.WeakKeyDictionary[AsyncEngine, AsyncEngine] = (
    weakref.WeakKeyDictionary()
)


def use_autocommit_engine(engine: AsyncEngine, dedicated: AsyncEngine) -> None:
    """Send `engine`'s autocommit work to `dedicated` (made with create_engine(...,
    autocommit=True)): a pool of its own, so no connection is switched per checkout
    (the worker's hot path: claims, checkpoints, lease renewals)."""
    _autocommit_engines[engine] = dedicated


def autocommit(engine: AsyncEngine) -> AsyncEngine:
    """The same pool (or the dedicated one registered for it), with connections in
    autocommit: no BEGIN and no COMMIT round trip."""
    found = _autocommit_engines.get(engine)
    if found is None:
        found = _autocommit_engines[engine] = engine.execution_options(isolation_level="AUTOCOMMIT")
    return found


class UnitOfWork:
    """One transaction plus the side effects that wait for its commit.

    `read_only=True` (the hot GET routes, marked with `read_only`): the session's
    connection runs in autocommit, so a request that only reads sends its statements
    and nothing else: no BEGIN, no COMMIT. Each statement sees its own snapshot, which
    a single-statement read cannot tell apart; a write that slips in (the sign-in
    activity stamp) commits on its own. Bound to a connection (the tests' rolled-back
    transaction), it is an ordinary unit of work.
    """

    def __init__(
        self, sessionmaker: async_sessionmaker[AsyncSession], *, read_only: bool = False
    ) -> None:
        self._sessionmaker = sessionmaker
        self._after_commit: list[AfterCommit] = []
        self._on_rollback: list[AfterCommit] = []
        self._read_only = read_only
        # Read-only on an autocommit connection (not when bound to a test's connection).
        self._autocommit = False
        self.session: AsyncSession

    def after_commit(self, callback: AfterCommit) -> None:
        self._after_commit.append(callback)

    def on_rollback(self, callback: AfterCommit) -> None:
        """Undo something held outside the database (a quota place reserved in Redis)
        if this unit's writes do not commit: it is rolled back, or its commit fails.
        Dropped once a commit went through."""
        self._on_rollback.append(callback)

    async def commit(self) -> None:
        """Commit now and send what waited for it (a request that goes on after its
        write is durable: `POST /executions?wait=`); the unit of work stays usable."""
        await self.session.commit()
        self._on_rollback.clear()
        await self._run(self._take(self._after_commit), "after_commit.failed")

    async def __aenter__(self) -> Self:
        bind = self._sessionmaker.kw.get("bind")
        if self._read_only and isinstance(bind, AsyncEngine):
            self.session = self._sessionmaker(bind=autocommit(bind))
            self._autocommit = True
        else:
            self.session = self._sessionmaker()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, _: object
    ) -> None:
        committed = False
        try:
            if exc_type is None and self._autocommit and not self._pending():
                # Nothing to write, and autocommit: a commit would only walk the
                # session's transaction machinery (~5 % of a hot read's CPU).
                pass
            elif exc_type is None:
                await self.session.commit()
            elif isinstance(exc, DomainError) and exc.keep_changes:
                # The refusal is recorded, but the request failed: nothing it meant to
                # send or enqueue goes out.
                await self.session.commit()
                self._after_commit.clear()
            else:
                await self.session.rollback()
                self._after_commit.clear()
            committed = exc_type is None or (isinstance(exc, DomainError) and exc.keep_changes)
        finally:
            try:
                await self.session.close()
            finally:
                undo = self._take(self._on_rollback)
                if not committed:
                    # A commit that raised may still have reached the server (a
                    # connection lost on the way back): undone all the same, so a quota
                    # errs by one place towards the caller, never holds a lost one.
                    self._after_commit.clear()
                    await self._run(undo, "on_rollback.failed")
        await self._run(self._take(self._after_commit), "after_commit.failed")

    def _pending(self) -> bool:
        """Anything a commit would write or announce: unflushed changes, or what flushes
        and announce() left in `session.info` for the session's after-commit hooks (live
        notices, cache evictions, pushes)."""
        session = self.session
        return bool(session.new or session.dirty or session.deleted or session.info)

    @staticmethod
    def _take(callbacks: list[AfterCommit]) -> list[AfterCommit]:
        taken = callbacks[:]
        callbacks.clear()
        return taken

    @staticmethod
    async def _run(callbacks: list[AfterCommit], event: str) -> None:
        for callback in callbacks:
            # The transaction is settled; a failing side effect must not turn the
            # request into an error the client would retry. Whatever was missed is
            # recovered from the database (the reaper requeues stranded executions;
            # quota counters are rebuilt from the rows when Redis loses them).
            try:
                result = callback()
                if isinstance(result, Awaitable):
                    await result
            except Exception:
                log.exception(event, callback=getattr(callback, "__name__", "?"))


F = TypeVar("F", bound=Callable[..., Any])
_READ_METHODS = frozenset({"GET", "HEAD"})


def read_only(endpoint: F) -> F:
    """Marks a GET route whose unit of work only reads (see UnitOfWork)."""
    endpoint.__read_only__ = True  # type: ignore[attr-defined]
    return endpoint


async def _unit_of_work(request: Request) -> AsyncIterator[UnitOfWork]:
    reads = request.method in _READ_METHODS and getattr(
        request.scope.get("endpoint"), "__read_only__", False
    )
    async with UnitOfWork(request.app.state.sessionmaker, read_only=reads) as uow:
        yield uow


async def _session(
    uow: Annotated[UnitOfWork, Depends(_unit_of_work, scope="function")],
) -> AsyncSession:
    return uow.session


# scope="function": the commit happens before the response is sent, so a client that
# sees 2xx knows its write is durable.
UnitOfWorkDep = Annotated[UnitOfWork, Depends(_unit_of_work, scope="function")]
SessionDep = Annotated[AsyncSession, Depends(_session)]
