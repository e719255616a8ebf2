"""MCP fixtures: real SDK servers on 127.0.0.1 (streamable HTTP and SSE), an API whose
settings allow loopback and list one stdio server (this repo's own SDK server, run as
`python -m tests.support.mcp_server`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import McpSettings, Settings, StdioCommand
from tests.support.asgi import client_for
from tests.support.engine import loopback_settings
from tests.support.mcp_server import McpServers, mcp_servers
from tests.support.procs import PYTHON


def mcp_settings(settings: Settings) -> Settings:
    stdio = StdioCommand(
        command=str(PYTHON),
        args=["-m", "tests.support.mcp_server"],
        env_keys=["DEMO_TOKEN"],
        description="the tests' own SDK server over stdio",
    )
    mcp = McpSettings(
        connect_timeout_s=15,
        call_timeout_s=15,
        max_result_bytes=4096,
        stdio_servers={"demo": stdio},
    )
    return loopback_settings(settings).model_copy(update={"mcp": mcp})


@pytest.fixture(scope="module")
def servers() -> Iterator[McpServers]:
    with mcp_servers() as s:
        yield s


@pytest.fixture
def local(settings: Settings) -> Settings:
    return mcp_settings(settings)


@pytest.fixture
async def api(
    local: Settings, sessionmaker: async_sessionmaker[AsyncSession]
) -> AsyncIterator[httpx.AsyncClient]:
    from backend.main import create_app

    app: FastAPI = create_app(local)
    async for c in client_for(app, sessionmaker):
        yield c
