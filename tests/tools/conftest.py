"""Tools API fixtures: the local sites and providers (tests/tools/sites.py), the local
Messages-API server, and an API whose settings point at them (loopback allow-listed
for the SSRF guard, small caps so the limits are reachable)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.kit.crypto import hash_token, new_token
from backend.main import create_app
from backend.models import ApiKey, ToolUsage, Workspace
from tests.support.asgi import client_for
from tests.support.engine import loopback_settings
from tests.support.fake_anthropic import fake_anthropic
from tests.tools.sites import IMAGE_KEY, Sites, local_sites

API = "/api/v1/tools"
Requests = list[dict[str, Any]]


@pytest.fixture(scope="module")
def sites() -> Iterator[Sites]:
    with local_sites() as s:
        yield s


@pytest.fixture(scope="module")
def anthropic_server() -> Iterator[tuple[str, Requests]]:
    with fake_anthropic() as server:
        yield server


def configure(settings: Settings, **tools: Any) -> Settings:
    return settings.model_copy(update={"tools": settings.tools.model_copy(update=tools)})


@pytest.fixture
def local(settings: Settings, sites: Sites, anthropic_server: tuple[str, Requests]) -> Settings:
    """Loopback allowed, the model at the local server, SearXNG and images configured,
    small caps (64 KiB pages, 1 s reads)."""
    url, _ = anthropic_server
    base = loopback_settings(settings)
    anthropic = base.anthropic.model_copy(
        update={"api_key": SecretStr("sk-test-local"), "base_url": url, "max_retries": 0}
    )
    return configure(
        base.model_copy(update={"anthropic": anthropic}),
        rate_limit="100 per hour",
        chat_max_tokens=256,
        web_read_timeout_s=1.0,
        web_read_max_bytes=64 * 1024,
        web_read_max_chars=50_000,
        search_provider="searxng",
        search_url=f"{sites.base}/searx/search",
        search_timeout_s=2.0,
        image_url=f"{sites.base}/v1/images/generations",
        image_api_key=SecretStr(IMAGE_KEY),
        image_timeout_s=5.0,
    )


ApiFor = Callable[[Settings], AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def api_for(sessionmaker: async_sessionmaker[AsyncSession]) -> ApiFor:
    """Clients of apps with other settings, in the test's transaction: `async with
    api_for(settings) as client`."""

    @asynccontextmanager
    async def make(configured: Settings) -> AsyncIterator[httpx.AsyncClient]:
        async for c in client_for(create_app(configured), sessionmaker):
            yield c

    return make


@pytest.fixture
async def api(
    local: Settings, sessionmaker: async_sessionmaker[AsyncSession]
) -> AsyncIterator[httpx.AsyncClient]:
    async for c in client_for(create_app(local), sessionmaker):
        yield c


async def usage_rows(session: AsyncSession, workspace: Workspace) -> list[ToolUsage]:
    rows = await session.scalars(
        select(ToolUsage)
        .where(ToolUsage.workspace_id == workspace.id)
        .order_by(ToolUsage.created_at, ToolUsage.id)
    )
    return list(rows.all())


async def api_key_for(session: AsyncSession, workspace: Workspace, user_id: uuid.UUID) -> str:
    """An editor-role API key made by `user_id` (its budget is that user's)."""
    key = new_token("osk_")
    session.add(
        ApiKey(
            workspace_id=workspace.id,
            created_by=user_id,
            name=f"k-{uuid.uuid4().hex[:6]}",
            prefix=key[:12],
            key_hash=hash_token(key),
            role="editor",
        )
    )
    await session.flush()
    return key
