"""Engine test fixtures: a runner called directly (no broker) on committed data (the
`maker` and `workspace` fixtures are tests/conftest.py's), and a local HTTP target."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.kit.http_guard import guarded_client
from tests.support.engine import Enqueued
from tests.support.target import Target, http_target
from workers.engine.runner import Runner


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    with http_target() as t:
        yield t


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
