"""Webhook signatures in the Standard Webhooks style (standardwebhooks.com).

Outgoing (notify nodes, workflow notifications) and incoming (webhook triggers) use the
same scheme, so a receiver built for one can check the other:

    webhook-id: msg_<random>          webhook-timestamp: <unix seconds>
    webhook-signature: v1,<base64(HMAC-SHA256(secret, f"{id}.{timestamp}.{body}"))>

Several space-separated signatures may be sent during a secret rotation; any one
matching is enough. Comparison is constant-time; a timestamp outside the tolerance is
refused so a captured request cannot be replayed later (replayed ids inside the window
are the caller's to remember).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

TOLERANCE_S = 300
ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER = (
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
)


class SignatureError(ValueError):
    """Why a signed request was refused (the message is safe to return)."""


def new_secret() -> str:
    """A signing secret in the `whsec_<base64>` form Standard Webhooks libraries read."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign(secret: str, body: bytes, *, message_id: str | None = None) -> dict[str, str]:
    """The headers for one signed delivery of `body`."""
    message_id = message_id or "msg_" + secrets.token_urlsafe(16)
    timestamp = int(time.time())
    return {
        ID_HEADER: message_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(secret, message_id, timestamp, body),
    }


def verify(
    secret: str,
    headers: dict[str, str],
    body: bytes,
    *,
    now: float | None = None,
    tolerance_s: int = TOLERANCE_S,
) -> str:
    """Check a delivery; returns its message id (for replay detection) or raises."""
    lower = {k.lower(): v for k, v in headers.items()}
    message_id = lower.get(ID_HEADER)
    raw_timestamp = lower.get(TIMESTAMP_HEADER)
    sent = lower.get(SIGNATURE_HEADER)
    if not message_id or not raw_timestamp or not sent:
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(raw_timestamp)
    except ValueError:
        raise SignatureError("webhook-timestamp is not a unix timestamp") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise SignatureError("webhook-timestamp is outside the tolerance")
    expected = signature(secret, message_id, timestamp, body).encode()
    for candidate in sent.split():
        if hmac.compare_digest(candidate.encode(), expected):
            return message_id
    raise SignatureError("no signature matches")
