"""Trigger test fixtures: committed workspaces for tests that need several
connections, and a local webhook receiver. The helpers are tests.support.triggers'."""

from __future__ import annotations

import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from backend.kit.db import create_sessionmaker
from backend.models import Workspace
from tests.support.factories import WorkspaceFactory, create
from tests.support.triggers import Receiver, published, with_trigger

# tests/test_main.py and tests/test_api_property.py import these from here (they were
# being edited elsewhere when the helpers moved to tests.support.triggers).
__all__ = ["published", "with_trigger"]


@pytest.fixture
async def committed(
    engine: AsyncEngine,
) -> AsyncIterator[tuple[async_sessionmaker[AsyncSession], Callable[[], Awaitable[Workspace]]]]:
    """A real sessionmaker (commits are commits) and a maker of workspaces that are
    deleted, with everything in them, after the test."""
    maker = create_sessionmaker(engine)
    made: list[uuid.UUID] = []

    async def new_workspace() -> Workspace:
        async with maker() as session:
            workspace = await create(session, WorkspaceFactory, name="Committed")
            await session.commit()
            made.append(workspace.id)
            return workspace

    yield maker, new_workspace
    async with maker() as session:
        await session.execute(delete(Workspace).where(Workspace.id.in_(made)))
        await session.commit()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    thread = threading.Thread(target=r.server.serve_forever, daemon=True)
    thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()
    thread.join(5)
