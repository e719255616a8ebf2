"""Request context and hardening, in one pure ASGI layer (no extra task per request;
streaming responses such as SSE pass straight through):

- an id on every request (taken from X-Request-ID when sane), bound to every log line
  of the request, echoed in the response, and one access line with the timing;
- the client's address and user agent, for the activity log;
- security headers on every response;
- a cap on the request body, by Content-Length and by the bytes actually received;
- the input rules of `bodies` (finite numbers, no NUL, bounded JSON depth) applied to
  path, query string, headers and JSON or form bodies before any route sees them, so
  every route, typed or raw, refuses the same things with the same 422.
"""

from __future__ import annotations

import json
import os
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass

import structlog
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.kit import bodies
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


async def read_capped(request: Request, limit: int) -> bytes:
    """A route's own, smaller cap on its body (a public hook's): 413 as soon as more
    than `limit` bytes came, without reading the rest."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(limit)
    return body


def _header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == wanted:
            return str(value.decode("latin-1"))
    return None


def _incoming_id(scope: Scope) -> str | None:
    candidate = _header(scope, REQUEST_ID_HEADER)
    # Anything else could forge log lines or bloat them.
    return candidate if candidate and _SAFE_ID.match(candidate) else None


# Methods whose body a route may read; others pass through unread.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _check_envelope(scope: Scope) -> None:
    """Path, query string and headers: no NUL anywhere a route could take a value."""
    bodies.check_text(scope.get("path", ""), "path", "path")
    bodies.check_query(scope.get("query_string", b""))
    for name, value in scope.get("headers", ()):
        bodies.check_text(value.decode("latin-1"), name.decode("latin-1"), "header")


async def _checked_body(scope: Scope, receive: Receive) -> Receive:
    """Read a JSON or form body whole (the cap still applies), check it, and hand the
    same bytes on. Other bodies (uploads) stream through untouched."""
    content_type = _header(scope, b"content-type")
    if scope["method"] not in _BODY_METHODS or not (
        content_type is None or bodies.is_json(content_type) or bodies.is_form(content_type)
    ):
        return receive
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            # The client left: whatever reads next sees that.
            pending: list[Message] = [message]
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            pending = []
            break
    body = b"".join(chunks)
    bodies.check_body(content_type, body)
    replay: list[Message] = [{"type": "http.request", "body": body, "more_body": False}, *pending]

    async def replayed() -> Message:
        return replay.pop(0) if replay else await receive()

    return replayed


def rejected_body(problem: bodies.Problem, request_id: str) -> dict[str, object]:
    return {
        "error": "validation_error",
        "detail": f"{problem.field}: {problem.message}",
        REQUEST_ID_KEY: request_id,
        "fields": [
            {
                "field": problem.field,
                "in": problem.where,
                "message": problem.message,
                "type": problem.type,
            }
        ],
    }


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, hsts: bool = False) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        # 32 random hex digits, as uuid4().hex gave, without building a UUID object.
        request_id = _incoming_id(scope) or os.urandom(16).hex()
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
                headers = message.get("headers", [])
                # A page that states its own policy (the console) keeps it: a second
                # CSP header would intersect with it and block the page's scripts.
                own_csp = any(name.lower() == API_CSP[0] for name, _ in headers)
                message["headers"] = [
                    *headers,
                    *(h for h in extra_headers if not (own_csp and h is API_CSP)),
                ]
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
                and declared.isascii()
                and declared.isdigit()
                and int(declared) > limit
            ):
                raise BodyTooLarge(limit)
            try:
                _check_envelope(scope)
            except bodies.InputRejected:
                if scope["type"] != "websocket":
                    raise
                # Closing before the handshake is accepted answers the upgrade with 403.
                await receive()
                await send({"type": "websocket.close", "code": 1008})
                return
            downstream = (
                await _checked_body(scope, capped_receive)
                if scope["type"] == "http"
                else capped_receive
            )
            # A WebSocket's messages go straight out: the headers above belong to HTTP
            # answers, and a live-progress socket sends thousands of frames a second
            # (one wrapper call less on each of them).
            await self.app(
                scope, downstream, send_with_headers if scope["type"] == "http" else send
            )
        except Exception as exc:
            # Answered here rather than by Starlette's ServerErrorMiddleware, which sits
            # outside us and would answer after the request id is gone. The trace goes
            # to the log with the request id; the client gets the id, never the trace.
            if scope["type"] != "http" or response_started:
                log.exception("unhandled_error", exc_type=type(exc).__name__)
                raise
            body: dict[str, object]
            if isinstance(exc, BodyTooLarge):
                code = 413
                body = {"error": "payload_too_large", "detail": str(exc.detail)}
            elif isinstance(exc, bodies.InputRejected):
                code, body = 422, rejected_body(exc.problem, request_id)
            else:
                log.exception("unhandled_error", exc_type=type(exc).__name__)
                code, body = 500, {"error": "internal_error", "detail": "internal server error"}
            body[REQUEST_ID_KEY] = request_id
            await send_with_headers(
                {
                    "type": "http.response.start",
                    "status": code,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
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
