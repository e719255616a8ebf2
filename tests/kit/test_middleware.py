"""Hardening on every response: security headers, a body cap, CORS from settings, and a
per-user rate limit on the API backed by Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.main import create_app
from tests.support.asgi import client_for
from tests.support.identity import make_user, sign_in


async def test_security_headers_on_every_response(client: httpx.AsyncClient) -> None:
    for r in (
        await client.get("/health"),
        await client.get("/api/v1/auth/me"),
        await client.get("/nope"),
    ):
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert "default-src 'none'" in r.headers["content-security-policy"]
    # The docs page loads Swagger UI's scripts, so it keeps the browser defaults.
    assert "content-security-policy" not in (await client.get("/docs")).headers


async def test_body_larger_than_the_cap_is_413(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    small = settings.model_copy(
        update={"security": settings.security.model_copy(update={"max_body_bytes": 2048})}
    )
    async for c in client_for(create_app(small), sessionmaker):
        r = await c.post(
            "/api/v1/auth/request-otp",
            content=b"x" * 4096,
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413
        assert r.json()["error"] == "payload_too_large"

        # Without a Content-Length (chunked), the bytes are counted as they arrive.
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(4):
                yield b"x" * 1024

        r = await c.post(
            "/api/v1/auth/request-otp",
            content=chunks(),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413


async def test_cors_from_settings_never_wildcard_with_credentials(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    allowed = settings.model_copy(
        update={
            "security": settings.security.model_copy(
                update={"cors_origins": ["https://studio.example.com"]}
            )
        }
    )
    async for c in client_for(create_app(allowed), sessionmaker):
        pre = {"Origin": "https://studio.example.com", "Access-Control-Request-Method": "POST"}
        r = await c.options("/api/v1/workspaces", headers=pre)
        assert r.headers["access-control-allow-origin"] == "https://studio.example.com"
        assert r.headers["access-control-allow-credentials"] == "true"
        r = await c.options("/api/v1/workspaces", headers={**pre, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    anywhere = settings.model_copy(
        update={"security": settings.security.model_copy(update={"cors_origins": ["*"]})}
    )
    async for c in client_for(create_app(anywhere), sessionmaker):
        r = await c.get("/health", headers={"Origin": "https://any.example"})
        assert r.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in r.headers


async def test_api_rate_limit_per_user_answers_429_with_retry_after(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], session: AsyncSession
) -> None:
    tight = settings.model_copy(
        update={"auth": settings.auth.model_copy(update={"api_rate_limit": "3 per minute"})}
    )
    actor = await sign_in(session, settings, await make_user(session))
    other = await sign_in(session, settings, await make_user(session))
    async for c in client_for(create_app(tight), sessionmaker):
        statuses = [
            (await c.get("/api/v1/auth/me", headers=actor.headers)).status_code for _ in range(4)
        ]
        assert statuses == [200, 200, 200, 429]
        r = await c.get("/api/v1/auth/me", headers=actor.headers)
        assert r.json()["error"] == "rate_limited"
        assert 1 <= int(r.headers["retry-after"]) <= 61
        # The limit is per user: someone else is not affected.
        assert (await c.get("/api/v1/auth/me", headers=other.headers)).status_code == 200


def test_secret_bearing_paths_are_redacted_in_the_access_log() -> None:
    from backend.kit.middleware import loggable_path

    assert (
        loggable_path("/api/v1/invitations/s3cr3t-token/accept")
        == "/api/v1/invitations/[redacted]/accept"
    )
    assert loggable_path("/api/v1/hooks/abc") == "/api/v1/hooks/[redacted]"
    assert loggable_path("/api/v1/invitations") == "/api/v1/invitations"


def test_a_websocket_upgrade_carrying_nul_is_refused_before_any_route() -> None:
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from backend.config import get_settings

    # No lifespan needed: the middleware refuses before routing, like it answers 422
    # to an HTTP request (a refused upgrade reaches the client as a close, 1008).
    client = TestClient(create_app(get_settings()))
    with (
        pytest.raises(WebSocketDisconnect) as refused,
        client.websocket_connect("/api/v1/ws?token=a%00b"),
    ):
        pass
    assert refused.value.code == 1008
