"""JWTs with PyJWT. The algorithm comes from settings and is the only one accepted;
issuer, audience, expiry, issue time, id, subject and type are all required."""

from __future__ import annotations

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
