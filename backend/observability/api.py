"""The API's metrics: a request middleware (route template, method, status, latency,
open WebSockets) and GET /metrics, which needs METRICS__TOKEN as a bearer token, or is
served only on the private METRICS__API_PORT listener when no token is set."""

from __future__ import annotations

import hmac
import time
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.config import Settings
from backend.kit.logging import REQUEST_ID_KEY, current_request_id, get_logger
from backend.observability import metrics, tracing

log = get_logger(__name__)


def _route(scope: Scope) -> str:
    # The template (/api/v1/executions/{execution_id}), never the raw path: one series
    # per route, however many ids clients send. Unrouted requests share one label.
    route = scope.get("route")
    template = getattr(route, "path", None)
    if not template:
        return "unmatched"
    # Routers mounted under a prefix match the rest of the path: put the prefix back,
    # taken from the request's own path (as many leading segments as it has more).
    parts = str(scope.get("path", "")).split("/")
    extra = len(parts) - 1 - str(template).count("/")
    prefix = "/".join(parts[: extra + 1]) if extra > 0 else ""
    return prefix + str(template)


# (route, method, status) -> its request counter and latency histogram. labels() checks
# and locks on every call (~2 % of a hot read's CPU); the series are few (route
# templates, not paths), so each is looked up once. Bounded all the same.
_SERIES: dict[tuple[str, str, int], tuple[Any, Any]] = {}
_SERIES_MAX = 10_000


def _series(route: str, method: str, status: int) -> tuple[Any, Any]:
    found = _SERIES.get((route, method, status))
    if found is None:
        found = (
            metrics.HTTP_REQUESTS.labels(route=route, method=method, status=str(status)),
            metrics.HTTP_LATENCY.labels(route=route, method=method),
        )
        if len(_SERIES) < _SERIES_MAX:
            _SERIES[(route, method, status)] = found
    return found


class MetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._socket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            counter, latency = _series(_route(scope), scope.get("method", "GET"), status)
            counter.inc()
            latency.observe(time.perf_counter() - started)

    async def _socket(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Counted at the client's connect, which the endpoint receives after routing (so
        # the route template is known): watching `receive` costs once per client
        # message, where watching `send` cost a call on every frame of a live stream.
        gauge: Any = None

        async def watch() -> Message:
            nonlocal gauge
            message = await receive()
            if message["type"] == "websocket.connect" and gauge is None:
                gauge = metrics.WEBSOCKETS.labels(route=_route(scope))
                gauge.inc()
            return message

        try:
            await self.app(scope, watch, send)
        finally:
            if gauge is not None:
                gauge.dec()


def _exposition(app: FastAPI) -> tuple[bytes, str]:
    extra = []
    engine = getattr(app.state, "engine", None)
    if engine is not None:
        extra.append(metrics.PoolInUse(engine))
    return metrics.render(metrics.registry(*extra))


def install(app: FastAPI, settings: Settings) -> None:
    """Middleware, GET /metrics, the private listener when METRICS__API_PORT is set, and
    traces when OTEL_EXPORTER_OTLP_ENDPOINT is set (FastAPI's own request spans)."""
    tracing.setup(settings, "api")
    app.add_middleware(MetricsMiddleware)
    # An empty token (a compose file's `${METRICS__TOKEN:-}`) is no token: "Bearer "
    # must never open the endpoint.
    token = settings.metrics.token.get_secret_value() if settings.metrics.token else None
    token = token or None

    @app.get(
        "/metrics",
        include_in_schema=True,
        tags=["operations"],
        responses={
            200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
            404: {"description": "No METRICS__TOKEN set, or not this bearer token"},
        },
    )
    async def prometheus_metrics(request: Request) -> Response:
        """Prometheus text format. Needs `Authorization: Bearer <METRICS__TOKEN>`; with no
        token set, it is served only on the private port (METRICS__API_PORT)."""
        given = request.headers.get("authorization", "")
        if token is None or not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            # Not there, as far as a caller without the token can tell: the same body
            # as any other 404 (with the request id the error schema requires).
            return JSONResponse(
                {
                    "error": "not_found",
                    "detail": "Not Found",
                    REQUEST_ID_KEY: current_request_id() or "",
                },
                status_code=404,
            )
        body, content_type = _exposition(request.app)
        return Response(content=body, media_type=content_type)

    if settings.metrics.api_port:
        _private_listener(app, settings)


def _private_listener(app: FastAPI, settings: Settings) -> None:
    from prometheus_client import start_http_server

    class _Live:
        """Reads the app's pool when scraped (the engine exists once the app started)."""

        def collect(self) -> Any:
            engine = getattr(app.state, "engine", None)
            if engine is not None:
                yield from metrics.PoolInUse(engine).collect()

    try:
        start_http_server(
            settings.metrics.api_port,
            addr=settings.metrics.address,
            registry=metrics.registry(_Live()),
        )
    except OSError as exc:
        # Another API process of this host has it (uvicorn --workers): that one serves
        # the numbers of all of them (multiprocess), so this is not an error.
        log.info("metrics.port_taken", port=settings.metrics.api_port, error=str(exc))
