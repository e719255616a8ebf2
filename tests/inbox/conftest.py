"""A runner called directly (no broker) on committed data, as in tests/engine."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.kit.http_guard import guarded_client
from tests.support.engine import Enqueued, loopback_settings
from workers.engine.runner import Runner


@pytest.fixture
async def runner(
    settings: Settings, maker: async_sessionmaker[AsyncSession]
) -> AsyncIterator[Runner]:
    async with guarded_client(["127.0.0.1/32"]) as http:
        name = f"test-{uuid.uuid4().hex[:6]}"
        yield Runner(loopback_settings(settings), maker, http, name, Enqueued())
