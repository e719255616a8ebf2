"""Engine test fixtures: a runner called directly (no broker) on committed data, a
workspace to run in, and a local HTTP target."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.kit.db import UnitOfWork
from backend.kit.http_guard import guarded_client
from backend.models import Workspace
from tests.support.target import Target, http_target
from workers.engine.runner import Runner


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    with http_target() as t:
        yield t


@pytest.fixture
def maker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # Committed data: the runner opens its own transactions, as in a worker.
    return async_sessionmaker(engine, expire_on_commit=False)


@pytest.fixture
async def workspace(maker: async_sessionmaker[AsyncSession]) -> Workspace:
    async with UnitOfWork(maker) as uow:
        ws = Workspace(name="Engine", slug=f"engine-{uuid.uuid4().hex[:10]}")
        uow.session.add(ws)
    return ws


class Enqueued(list[tuple[uuid.UUID, float]]):
    def __call__(self, execution_id: uuid.UUID, countdown: float) -> None:
        self.append((execution_id, countdown))


@pytest.fixture
async def runner(
    settings: Settings, maker: async_sessionmaker[AsyncSession]
) -> AsyncIterator[Runner]:
    local = settings.model_copy(
        update={
            "http": settings.http.model_copy(update={"allow_private_networks": ["127.0.0.1/32"]}),
            "engine": settings.engine.model_copy(update={"watch_interval_s": 0.1}),
        }
    )
    async with guarded_client(["127.0.0.1/32"]) as http:
        yield Runner(local, maker, http, f"test-{uuid.uuid4().hex[:6]}", Enqueued())
