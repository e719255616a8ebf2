"""JWTs with PyJWT. The algorithm comes from settings and is the only one accepted;
issuer, audience, expiry, issue time, id, subject and type are all required."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import jwt

from backend.config import Settings
from backend.kit.errors import Unauthenticated

TokenType = Literal["access", "refresh"]
REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub", "jti", "sid", "typ"]


@dataclass(frozen=True, slots=True)
class Claims:
    user_id: uuid.UUID
    session_id: uuid.UUID
    jti: str
    type: TokenType
    # When the token stops being valid: live connections close then.
    expires_at: datetime | None = None


def issue(
    settings: Settings, *, user_id: uuid.UUID, session_id: uuid.UUID, type_: TokenType
) -> str:
    auth = settings.auth
    now = datetime.now(UTC)
    ttl = auth.access_token_ttl_s if type_ == "access" else auth.refresh_token_ttl_s
    payload = {
        "iss": auth.jwt_issuer,
        "aud": auth.jwt_audience,
        "sub": str(user_id),
        "sid": str(session_id),
        "typ": type_,
        "jti": uuid.uuid4().hex,
        "iat": now,
        "exp": now + timedelta(seconds=ttl),
    }
    return jwt.encode(payload, settings.security.secret_key.get_secret_value(), auth.jwt_algorithm)


# Access tokens this process has verified: token -> (its claims, what it was checked
# against, when it expires). Checking a signature and seven claims cost more than the
# rest of authenticating a request whose principal is cached, and a client sends the
# same token on every request until it expires. The expiry is checked on every hit;
# the size is a bound on memory, not on correctness (past it the oldest go first).
_VERIFIED: dict[str, tuple[Claims, tuple[str, ...], float]] = {}
VERIFIED_MAX = 10_000


def decode_access(settings: Settings, token: str) -> Claims:
    """`decode(..., expected="access")`, remembered for the token's lifetime."""
    auth = settings.auth
    # A token checked under other settings (another key, issuer or audience: tests run
    # several apps in one process) is checked again.
    against = (
        settings.security.secret_key.get_secret_value(),
        auth.jwt_algorithm,
        auth.jwt_issuer,
        auth.jwt_audience,
    )
    hit = _VERIFIED.get(token)
    now = time.time()
    if hit is not None:
        claims, checked_with, expires = hit
        if checked_with == against and now < expires:
            return claims
        _VERIFIED.pop(token, None)
    claims = decode(settings, token, expected="access")
    if claims.expires_at is not None:
        if len(_VERIFIED) >= VERIFIED_MAX:
            for old in [t for t, (_, _, e) in _VERIFIED.items() if e <= now]:
                _VERIFIED.pop(old, None)
            while len(_VERIFIED) >= VERIFIED_MAX:
                _VERIFIED.pop(next(iter(_VERIFIED)))
        _VERIFIED[token] = (claims, against, claims.expires_at.timestamp())
    return claims


def decode(settings: Settings, token: str, *, expected: TokenType) -> Claims:
    auth = settings.auth
    try:
        payload = jwt.decode(
            token,
            settings.security.secret_key.get_secret_value(),
            algorithms=[auth.jwt_algorithm],
            audience=auth.jwt_audience,
            issuer=auth.jwt_issuer,
            options={"require": REQUIRED_CLAIMS},
        )
        if payload["typ"] != expected:
            raise Unauthenticated(f"a {payload['typ']} token cannot be used here")
        return Claims(
            user_id=uuid.UUID(payload["sub"]),
            session_id=uuid.UUID(payload["sid"]),
            jti=str(payload["jti"]),
            type=expected,
            expires_at=datetime.fromtimestamp(int(payload["exp"]), UTC),
        )
    except jwt.ExpiredSignatureError as exc:
        raise Unauthenticated("token expired") from exc
    except (jwt.InvalidTokenError, ValueError, KeyError) as exc:
        # One message for every other failure: no oracle for which check failed.
        raise Unauthenticated("invalid token") from exc
