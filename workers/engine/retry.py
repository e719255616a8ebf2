"""Which failures are worth another attempt, and when. Pure.

Transient: timeouts, connection errors, HTTP 429 and 5xx, Anthropic 429/529/overloaded.
Permanent: other 4xx, validation errors, and a spend-limit 429 (retrying it only
burns the next attempt too). A wait never exceeds the broker's safe countdown, so a
delayed retry can never be redelivered as a duplicate (celery#2599).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

ErrorClass = Literal[
    "timeout", "connection", "rate_limited", "server_error", "overloaded", "permanent", "cancelled"
]
TRANSIENT: frozenset[str] = frozenset(
    {"timeout", "connection", "rate_limited", "server_error", "overloaded"}
)


@dataclass
class NodeFailure(Exception):
    message: str
    error_class: ErrorClass = "permanent"
    # Seconds the remote side asked us to wait (Retry-After), if it said.
    retry_after_s: float | None = None

    def __str__(self) -> str:
        return self.message


def classify_status(status: int, body: str = "") -> ErrorClass:
    if status == 429:
        # A spend or quota limit will not lift in a few seconds.
        lowered = body.lower()
        if "spend" in lowered or "credit balance" in lowered or "quota" in lowered:
            return "permanent"
        return "rate_limited"
    if status == 529:
        return "overloaded"
    if status in (408, 425):
        return "timeout"
    if 500 <= status < 600:
        return "server_error"
    return "permanent"


def classify(exc: BaseException) -> NodeFailure:
    """Map what a handler raised to a NodeFailure with its class."""
    if isinstance(exc, NodeFailure):
        return exc
    import httpx

    from backend.kit.http_guard import BlockedAddress, Unresolvable

    # Only when the SDK was imported (an agent ran here): nothing it raises can reach
    # this otherwise, and its first import would stall the engine's loop for seconds.
    anthropic = sys.modules.get("anthropic")
    timeouts: tuple[type[BaseException], ...] = (TimeoutError, httpx.TimeoutException)
    connections: tuple[type[BaseException], ...] = (httpx.TransportError, ConnectionError)
    if anthropic is not None:
        timeouts += (anthropic.APITimeoutError,)
        connections += (anthropic.APIConnectionError,)
    if isinstance(exc, timeouts):
        return NodeFailure(f"timed out: {exc}", "timeout")
    if isinstance(exc, connections):
        # Only our own guard's messages are shown (what did not resolve, what may not be
        # reached): httpx's other errors can quote a header value, a credential's token.
        said = f": {exc}" if isinstance(exc, Unresolvable | BlockedAddress) else ""
        return NodeFailure(f"connection failed: {type(exc).__name__}{said}"[:500], "connection")
    if anthropic is not None and isinstance(exc, anthropic.APIStatusError):
        retry_after = _retry_after(exc.response.headers.get("retry-after"))
        body = str(exc.body) if exc.body is not None else exc.message
        cls = (
            "overloaded" if "overloaded" in body.lower() else classify_status(exc.status_code, body)
        )
        return NodeFailure(
            f"model provider answered {exc.status_code}: {exc.message}", cls, retry_after
        )
    if isinstance(exc, httpx.HTTPStatusError):
        retry_after = _retry_after(exc.response.headers.get("retry-after"))
        return NodeFailure(
            f"HTTP {exc.response.status_code}",
            classify_status(exc.response.status_code),
            retry_after,
        )
    return NodeFailure(f"{type(exc).__name__}: {exc}", "permanent")


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def retry_delay(
    failure: NodeFailure,
    *,
    attempt: int,
    max_retries: int,
    backoff_s: list[float],
    retry_on: list[str],
    max_countdown_s: float,
) -> float | None:
    """Seconds to wait before attempt `attempt + 1`, or None if the node fails now.

    `attempt` counts from 1 (the attempt that just failed).
    """
    if failure.error_class not in TRANSIENT or failure.error_class not in retry_on:
        return None
    if attempt > max_retries:
        return None
    planned = backoff_s[min(attempt - 1, len(backoff_s) - 1)] if backoff_s else 0.0
    wanted = max(planned, failure.retry_after_s or 0.0)
    return min(wanted, max_countdown_s)
