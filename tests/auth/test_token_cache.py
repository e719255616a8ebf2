"""Verified access tokens are remembered per process (backend/auth/tokens.py
`decode_access`), never past what a fresh check would refuse: the token's own expiry,
another signing key, issuer or audience, or the session behind it."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import jwt
import pytest
from pydantic import SecretStr
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth import tokens
from backend.auth.cache import cache
from backend.config import Settings
from backend.kit.errors import Unauthenticated
from backend.models import AuthSession
from tests.support.identity import make_user, sign_in


def _token(settings: Settings, *, expires_in_s: float) -> str:
    now = datetime.now(UTC)
    return jwt.encode(
        {
            "iss": settings.auth.jwt_issuer,
            "aud": settings.auth.jwt_audience,
            "sub": str(uuid.uuid4()),
            "sid": str(uuid.uuid4()),
            "typ": "access",
            "jti": uuid.uuid4().hex,
            "iat": now,
            "exp": now + timedelta(seconds=expires_in_s),
        },
        settings.security.secret_key.get_secret_value(),
        settings.auth.jwt_algorithm,
    )


async def test_a_remembered_token_is_refused_once_it_expires(settings: Settings) -> None:
    token = _token(settings, expires_in_s=1.2)
    first = tokens.decode_access(settings, token)
    assert tokens.decode_access(settings, token) is first  # remembered
    await asyncio.sleep(1.5)
    with pytest.raises(Unauthenticated, match="token expired"):
        tokens.decode_access(settings, token)


@pytest.mark.parametrize(
    "change",
    [
        {"secret_key": SecretStr("another-secret-key-of-at-least-32-characters-x")},
        {"jwt_issuer": "someone-else"},
        {"jwt_audience": "another-audience"},
    ],
    ids=["key", "issuer", "audience"],
)
async def test_a_remembered_token_is_checked_again_under_other_settings(
    settings: Settings, change: dict[str, object]
) -> None:
    token = _token(settings, expires_in_s=300)
    tokens.decode_access(settings, token)
    if "secret_key" in change:
        other = settings.model_copy(
            update={"security": settings.security.model_copy(update=change)}
        )
    else:
        other = settings.model_copy(update={"auth": settings.auth.model_copy(update=change)})
    with pytest.raises(Unauthenticated, match="invalid token"):
        tokens.decode_access(other, token)
    # The original settings still accept it.
    assert tokens.decode_access(settings, token).type == "access"


async def test_a_remembered_token_of_a_revoked_session_is_refused(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    actor = await sign_in(session, settings, await make_user(session))
    headers = {"Authorization": f"Bearer {actor.access_token}"}
    assert (await client.get("/api/v1/auth/me", headers=headers)).status_code == 200
    # As another process would: no ORM hook evicts anything here.
    await session.execute(
        update(AuthSession)
        .where(AuthSession.id == actor.session_id)
        .values(revoked_at=datetime.now(UTC))
    )
    cache.clear()  # the principal cache's own bound is tested in test_principal_cache
    refused = await client.get("/api/v1/auth/me", headers=headers)
    assert refused.status_code == 401
    assert refused.json()["error"] == "unauthenticated"
