"""n8n fixtures: a loopback stand-in that speaks n8n's public API (answers checked
against n8n's own OpenAPI spec), and an API whose settings let the SSRF guard reach
127.0.0.1 and retry quickly."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from tests.n8n.standin import StandIn, running
from tests.support.asgi import client_for
from tests.support.engine import loopback_settings

pytestmark = pytest.mark.xdist_group("n8n")


def n8n_settings(settings: Settings) -> Settings:
    n8n = settings.n8n.model_copy(update={"backoff_s": 0.01, "retries": 2, "page_size": 2})
    return loopback_settings(settings).model_copy(update={"n8n": n8n})


@pytest.fixture(scope="module")
def server() -> Iterator[StandIn]:
    with running() as s:
        yield s


@pytest.fixture
def standin(server: StandIn) -> Iterator[StandIn]:
    server.reset()
    yield server
    # Every answer the stand-in gave followed n8n's spec.
    assert server.violations == []


@pytest.fixture
def local(settings: Settings) -> Settings:
    return n8n_settings(settings)


@pytest.fixture
async def api(
    local: Settings, sessionmaker: async_sessionmaker[AsyncSession]
) -> AsyncIterator[httpx.AsyncClient]:
    from backend.main import create_app

    app: FastAPI = create_app(local)
    async for c in client_for(app, sessionmaker):
        yield c
