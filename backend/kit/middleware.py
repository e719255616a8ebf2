"""Request context: an id on every request (taken from X-Request-ID when sane), bound
to every log line of that request, echoed in the response, and one access line with
the timing. Pure ASGI rather than BaseHTTPMiddleware: no extra task per request and
streaming responses (SSE) pass straight through."""

from __future__ import annotations

import json
import re
import time
import uuid

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.kit.logging import REQUEST_ID_KEY, get_logger

REQUEST_ID_HEADER = b"x-request-id"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

log = get_logger("backend.access")


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER:
            candidate = value.decode("latin-1")
            # Anything else could forge log lines or bloat them.
            return candidate if _SAFE_ID.match(candidate) else None
    return None


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = _incoming_id(scope) or uuid.uuid4().hex
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(**{REQUEST_ID_KEY: request_id})
        scope.setdefault("state", {})[REQUEST_ID_KEY] = request_id
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER, request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            # Answered here rather than by Starlette's ServerErrorMiddleware, which sits
            # outside us and would answer after the request id is gone. The trace goes
            # to the log with the request id; the client gets the id, never the trace.
            log.exception("unhandled_error", exc_type=type(exc).__name__)
            if scope["type"] != "http" or response_started:
                raise
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            body = {"error": "internal_error", "detail": "internal server error"}
            body[REQUEST_ID_KEY] = request_id
            await send({"type": "http.response.body", "body": json.dumps(body).encode()})
        finally:
            if scope["type"] == "http":
                # Probes hit /health every few seconds; keep them out of INFO.
                emit = log.debug if scope["path"].startswith("/health") else log.info
                emit(
                    "request",
                    method=scope["method"],
                    path=scope["path"],
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 2),
                )
            structlog.contextvars.clear_contextvars()
