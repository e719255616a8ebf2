"""Token attacks answer 401; refresh rotates and a reused refresh token ends the session."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import func, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from backend.config import Settings
from backend.models import AuthSession
from tests.support.identity import Actor, make_user, sign_in


@pytest.fixture
async def actor(session: AsyncSession, settings: Settings) -> Actor:
    return await sign_in(session, settings, await make_user(session))


def claims(settings: Settings, actor: Actor, **override: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    base = {
        "iss": settings.auth.jwt_issuer,
        "aud": settings.auth.jwt_audience,
        "sub": str(actor.user.id),
        "sid": str(actor.session_id),
        "typ": "access",
        "jti": uuid.uuid4().hex,
        "iat": now,
        "exp": now + timedelta(minutes=5),
    }
    base.update(override)
    return {k: v for k, v in base.items() if v is not None}


def sign(settings: Settings, payload: dict[str, Any], alg: str | None = None) -> str:
    return jwt.encode(
        payload, settings.security.secret_key.get_secret_value(), alg or settings.auth.jwt_algorithm
    )


async def me(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})


async def test_valid_token_reads_me(client: httpx.AsyncClient, actor: Actor) -> None:
    r = await me(client, actor.access_token)
    assert r.status_code == 200
    assert r.json()["email"] == actor.user.email


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data, default=str).encode()).rstrip(b"=").decode()


async def test_alg_none_is_refused(
    client: httpx.AsyncClient, settings: Settings, actor: Actor
) -> None:
    payload = claims(settings, actor)
    payload = {k: int(v.timestamp()) if isinstance(v, datetime) else v for k, v in payload.items()}
    token = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(payload)}."
    r = await me(client, token)
    assert r.status_code == 401
    assert r.json()["error"] == "unauthenticated"


async def test_another_algorithm_is_refused(
    client: httpx.AsyncClient, settings: Settings, actor: Actor
) -> None:
    assert settings.auth.jwt_algorithm != "HS512"
    assert (
        await me(client, sign(settings, claims(settings, actor), alg="HS512"))
    ).status_code == 401


@pytest.mark.parametrize(
    "override",
    [
        {"exp": datetime.now(UTC) - timedelta(seconds=5)},
        {"aud": "someone-else"},
        {"iss": "https://evil.example"},
        {"typ": "refresh"},
        {"jti": None},
        {"sid": None},
        {"sid": str(uuid.uuid4())},
        {"sub": str(uuid.uuid4())},
    ],
    ids=[
        "expired",
        "wrong-aud",
        "wrong-iss",
        "refresh-as-access",
        "no-jti",
        "no-sid",
        "unknown-session",
        "other-subject",
    ],
)
async def test_bad_claims_are_refused(
    client: httpx.AsyncClient, settings: Settings, actor: Actor, override: dict[str, Any]
) -> None:
    r = await me(client, sign(settings, claims(settings, actor, **override)))
    assert r.status_code == 401, r.text


async def test_wrong_key_and_tampered_payload_are_refused(
    client: httpx.AsyncClient, settings: Settings, actor: Actor
) -> None:
    forged = jwt.encode(
        claims(settings, actor), "not-the-server-secret-at-all-000000", settings.auth.jwt_algorithm
    )
    assert (await me(client, forged)).status_code == 401
    header, _, signature = actor.access_token.split(".")
    tampered = f"{header}.{_b64({**claims(settings, actor), 'sub': str(uuid.uuid4())})}.{signature}"
    assert (await me(client, tampered)).status_code == 401


async def test_missing_or_garbage_credentials(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/v1/auth/me")).status_code == 401
    assert (await me(client, "garbage")).status_code == 401
    r = await client.get("/api/v1/auth/me", headers={"X-API-Key": "osk_not-a-real-key"})
    assert r.status_code == 401


async def test_logout_revokes_the_session(client: httpx.AsyncClient, actor: Actor) -> None:
    assert (await client.post("/api/v1/auth/logout", headers=actor.headers)).status_code == 204
    assert (await me(client, actor.access_token)).status_code == 401
    r = await client.post("/api/v1/auth/refresh", json={"refresh_token": actor.refresh_token})
    assert r.status_code == 401


async def test_refresh_rotates_and_reuse_revokes_the_family(
    client: httpx.AsyncClient, session: AsyncSession, actor: Actor
) -> None:
    first = await client.post("/api/v1/auth/refresh", json={"refresh_token": actor.refresh_token})
    assert first.status_code == 200, first.text
    pair = first.json()
    assert pair["refresh_token"] != actor.refresh_token
    assert (await me(client, pair["access_token"])).status_code == 200

    # Presented again at once: the owner's own clients racing. Refused, session stands.
    race = await client.post("/api/v1/auth/refresh", json={"refresh_token": actor.refresh_token})
    assert race.status_code == 401
    assert (await me(client, pair["access_token"])).status_code == 200

    # Presented again later: someone holds a stolen copy.
    await session.execute(
        update(AuthSession)
        .where(AuthSession.id == actor.session_id)
        .values(rotated_at=func.now() - text("interval '1 minute'"))
    )
    reuse = await client.post("/api/v1/auth/refresh", json={"refresh_token": actor.refresh_token})
    assert reuse.status_code == 401
    # Everything of that session is dead now, including the newest tokens.
    assert (await me(client, pair["access_token"])).status_code == 401
    assert (
        await client.post("/api/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    ).status_code == 401
    row = await session.get(AuthSession, actor.session_id)
    assert row is not None
    await session.refresh(row)
    assert row.revoked_reason == "refresh_token_reuse"


async def test_access_token_is_not_a_refresh_token(client: httpx.AsyncClient, actor: Actor) -> None:
    r = await client.post("/api/v1/auth/refresh", json={"refresh_token": actor.access_token})
    assert r.status_code == 401


async def test_me_updates_only_name_and_avatar(client: httpx.AsyncClient, actor: Actor) -> None:
    r = await client.patch(
        "/api/v1/auth/me",
        headers=actor.headers,
        json={"name": "Ada", "avatar_url": "https://img.example.com/a.png"},
    )
    assert r.status_code == 200
    assert r.json()["name"] == "Ada"
    for field in ("email", "id", "is_active", "role", "workspace_id"):
        r = await client.patch("/api/v1/auth/me", headers=actor.headers, json={field: "x"})
        assert r.status_code == 422, field
        assert r.json()["fields"][0]["field"] == field
