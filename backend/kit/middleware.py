"""Request context and hardening, in one pure ASGI layer (no extra task per request;
streaming responses such as SSE pass straight through):

- an id on every request (taken from X-Request-ID when sane), bound to every log line
  of the request, echoed in the response, and one access line with the timing;
- the client's address and user agent, for the activity log;
- security headers on every response;
- a cap on the request body, by Content-Length and by the bytes actually received.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass

import structlog
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.kit.logging import REQUEST_ID_KEY, get_logger

REQUEST_ID_HEADER = b"x-request-id"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]
# An API answers JSON: nothing in it should ever run or be framed. The interactive
# docs load Swagger UI's scripts, so they keep the browser defaults.
API_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
DOCS_PATHS = ("/docs", "/redoc")
HSTS = (b"strict-transport-security", b"max-age=63072000; includeSubDomains")

log = get_logger("backend.access")

# Paths that carry a secret (an invitation token, a webhook token): logged without it.
_SECRET_PATHS = re.compile(r"^(/api/v1/(?:invitations|hooks)/)[^/]+")


def loggable_path(path: str) -> str:
    return _SECRET_PATHS.sub(r"\1[redacted]", path)


@dataclass(frozen=True, slots=True)
class RequestMeta:
    ip: str | None
    user_agent: str | None


_NO_META = RequestMeta(ip=None, user_agent=None)  # frozen: safe to share as a default
request_meta: ContextVar[RequestMeta] = ContextVar("request_meta", default=_NO_META)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body is larger than {limit} bytes")


def _header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == wanted:
            return str(value.decode("latin-1"))
    return None


def _incoming_id(scope: Scope) -> str | None:
    candidate = _header(scope, REQUEST_ID_HEADER)
    # Anything else could forge log lines or bloat them.
    return candidate if candidate and _SAFE_ID.match(candidate) else None


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, hsts: bool = False) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = _incoming_id(scope) or uuid.uuid4().hex
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(**{REQUEST_ID_KEY: request_id})
        client = scope.get("client")
        request_meta.set(
            RequestMeta(
                ip=client[0] if client else None,
                user_agent=(_header(scope, b"user-agent") or "")[:512] or None,
            )
        )
        scope.setdefault("state", {})[REQUEST_ID_KEY] = request_id
        started = time.perf_counter()
        status = 500
        response_started = False
        path = scope.get("path", "")
        extra_headers = [(REQUEST_ID_HEADER, request_id.encode()), *SECURITY_HEADERS]
        if not path.startswith(DOCS_PATHS):
            extra_headers.append(API_CSP)
        if self.hsts:
            extra_headers.append(HSTS)

        async def send_with_headers(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", []), *extra_headers]
            await send(message)

        limit = self.max_body_bytes
        received = 0

        async def capped_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        try:
            declared = _header(scope, b"content-length")
            if (
                scope["type"] == "http"
                and declared
                and declared.isdigit()
                and int(declared) > limit
            ):
                raise BodyTooLarge(limit)
            await self.app(scope, capped_receive, send_with_headers)
        except Exception as exc:
            # Answered here rather than by Starlette's ServerErrorMiddleware, which sits
            # outside us and would answer after the request id is gone. The trace goes
            # to the log with the request id; the client gets the id, never the trace.
            if scope["type"] != "http" or response_started:
                log.exception("unhandled_error", exc_type=type(exc).__name__)
                raise
            if isinstance(exc, BodyTooLarge):
                code, error, detail = 413, "payload_too_large", str(exc.detail)
            else:
                log.exception("unhandled_error", exc_type=type(exc).__name__)
                code, error, detail = 500, "internal_error", "internal server error"
            await send_with_headers(
                {
                    "type": "http.response.start",
                    "status": code,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            body = {"error": error, "detail": detail, REQUEST_ID_KEY: request_id}
            await send({"type": "http.response.body", "body": json.dumps(body).encode()})
        finally:
            if scope["type"] == "http":
                # Probes hit /health every few seconds; keep them out of INFO.
                emit = log.debug if path.startswith("/health") else log.info
                emit(
                    "request",
                    method=scope["method"],
                    path=loggable_path(path),
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 2),
                )
            structlog.contextvars.clear_contextvars()
