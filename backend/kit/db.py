"""Database access: the async engine, and the unit of work every request and task runs in.

A unit of work commits once at the end when nothing raised and rolls back otherwise.
Side effects that must only happen for committed state (enqueueing a task, publishing
an event) are registered with `after_commit` and run after the commit succeeded; a
rolled-back unit of work sends nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Self

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from backend.config import Settings
from backend.kit.errors import DomainError
from backend.kit.logging import get_logger

log = get_logger(__name__)

AfterCommit = Callable[[], Awaitable[Any] | Any]


def create_engine(settings: Settings) -> AsyncEngine:
    return create_async_engine(
        settings.database_url,
        pool_size=settings.db.pool_size,
        max_overflow=settings.db.max_overflow,
        pool_timeout=settings.db.pool_timeout_s,
        # A connection dropped by a PostgreSQL restart is replaced, not handed out.
        pool_pre_ping=settings.db.pool_pre_ping,
        echo=settings.db.echo,
        connect_args={
            "options": f"-c statement_timeout={settings.db.statement_timeout_ms}",
            "application_name": settings.app_name[:60],
        },
    )


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # expire_on_commit=False: objects stay readable after commit, so a route can
    # serialise what it just saved without another round trip.
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


class UnitOfWork:
    """One transaction plus the side effects that wait for its commit."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self._sessionmaker = sessionmaker
        self._after_commit: list[AfterCommit] = []
        self.session: AsyncSession

    def after_commit(self, callback: AfterCommit) -> None:
        self._after_commit.append(callback)

    async def commit(self) -> None:
        """Commit now and send what waited for it (a request that goes on after its
        write is durable: `POST /executions?wait=`); the unit of work stays usable."""
        await self.session.commit()
        await self._run_after_commit()

    async def __aenter__(self) -> Self:
        self.session = self._sessionmaker()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, _: object
    ) -> None:
        try:
            if exc_type is None:
                await self.session.commit()
            elif isinstance(exc, DomainError) and exc.keep_changes:
                # The refusal is recorded, but the request failed: nothing it meant to
                # send or enqueue goes out.
                await self.session.commit()
                self._after_commit.clear()
            else:
                await self.session.rollback()
                self._after_commit.clear()
        finally:
            await self.session.close()
        await self._run_after_commit()

    async def _run_after_commit(self) -> None:
        callbacks, self._after_commit = self._after_commit, []
        for callback in callbacks:
            # The transaction is committed; a failing side effect must not turn the
            # request into an error the client would retry. Whatever was missed is
            # recovered from the database (the reaper requeues stranded executions).
            try:
                result = callback()
                if isinstance(result, Awaitable):
                    await result
            except Exception:
                log.exception("after_commit.failed", callback=getattr(callback, "__name__", "?"))


async def _unit_of_work(request: Request) -> AsyncIterator[UnitOfWork]:
    async with UnitOfWork(request.app.state.sessionmaker) as uow:
        yield uow


async def _session(
    uow: Annotated[UnitOfWork, Depends(_unit_of_work, scope="function")],
) -> AsyncSession:
    return uow.session


# scope="function": the commit happens before the response is sent, so a client that
# sees 2xx knows its write is durable.
UnitOfWorkDep = Annotated[UnitOfWork, Depends(_unit_of_work, scope="function")]
SessionDep = Annotated[AsyncSession, Depends(_session)]
