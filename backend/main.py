"""The FastAPI application: routers, middleware, and the one exception-to-status table."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from celery import Celery
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError as BrokerUnavailable
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend.agents.router import router as agents_router
from backend.analytics.router import router as analytics_router
from backend.analytics.router import sockets as analytics_sockets
from backend.auth.router import api_keys as api_keys_router
from backend.auth.router import router as auth_router
from backend.config import Settings, get_settings
from backend.console.router import router as console_router
from backend.credentials.router import router as credentials_router
from backend.executions.router import router as executions_router
from backend.files.router import router as files_router
from backend.generate.router import router as generate_router
from backend.health.router import router as health_router
from backend.inbox.router import public as task_links_router
from backend.inbox.router import router as tasks_router
from backend.kit import bodies, errors, hotpath, openapi
from backend.kit.celery_app import celery_app
from backend.kit.db import create_engine, create_sessionmaker
from backend.kit.logging import REQUEST_ID_KEY, configure_logging, current_request_id, get_logger
from backend.kit.middleware import RequestContextMiddleware, rejected_body
from backend.kit.ratelimit import RateLimiter
from backend.mcp.router import router as mcp_router
from backend.n8n.promotion_router import router as n8n_promotions_router
from backend.n8n.router import hooks as n8n_hooks_router
from backend.n8n.router import router as n8n_router
from backend.observability import api as observability_api
from backend.observability import tracing
from backend.push.router import router as notifications_router
from backend.quotas.router import router as quotas_router
from backend.realtime.hub import Hub
from backend.realtime.router import router as realtime_router
from backend.suggestions.router import router as suggestions_router
from backend.templates_library.router import router as templates_router
from backend.tools.router import router as tools_router
from backend.triggers.router import hooks as hooks_router
from backend.triggers.router import router as triggers_router
from backend.workflows.hot import ROUTES as WORKFLOW_HOT_ROUTES
from backend.workflows.router import router as workflows_router
from backend.workspaces.router import invitations as invitations_router
from backend.workspaces.router import router as workspaces_router

log = get_logger(__name__)

API_PREFIX = "/api/v1"

# Every domain error a client can see, and its status. Order matters: the first
# matching class wins, so subclasses come before their bases. Anything else is a bug:
# RequestContextMiddleware answers it with 500 "internal_error" and logs the trace.
EXCEPTION_STATUS: list[tuple[type[errors.DomainError], int]] = [
    (errors.InvalidTransition, 409),
    (errors.Conflict, 409),
    (errors.NotFound, 404),
    (errors.Unauthenticated, 401),
    (errors.PermissionDenied, 403),
    (errors.ValidationFailed, 422),
    (errors.QuotaExceeded, 402),
    (errors.RateLimited, 429),
    (errors.DependencyUnavailable, 503),
    (errors.NotConfigured, 424),
    (errors.UpstreamError, 502),
    (errors.DomainError, 400),
]

# Codes for errors raised as plain HTTP statuses (routing, method, framework checks).
HTTP_STATUS_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


# GET routes a front end polls, answered without FastAPI's dependency solving when the
# caches hold the caller (backend/kit/hotpath.py); the routes answer everything else.
HOT_ROUTES = (*WORKFLOW_HOT_ROUTES,)


def status_for(exc: errors.DomainError) -> int:
    for cls, status in EXCEPTION_STATUS:
        if isinstance(exc, cls):
            return status
    return 400


def _body(error: str, detail: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"error": error, "detail": detail, **extra}
    request_id = current_request_id()
    if request_id:
        body[REQUEST_ID_KEY] = request_id
    return body


def _field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    # ("body", "nodes", 2, "id") -> "nodes[2].id"; where it came from stays in "in".
    parts = (
        list(loc[1:])
        if loc and loc[0] in ("body", "query", "path", "header", "cookie")
        else list(loc)
    )
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or str(loc[0] if loc else "")


async def _domain_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.DomainError)
    extra: dict[str, Any] = dict(exc.extra)
    if exc.field:
        extra["field"] = exc.field
        if isinstance(exc, errors.ValidationFailed) and "fields" not in extra:
            # The same shape as a request that failed its schema: clients read one list.
            # Where the field was sent is the route's to know; a rule names only the field.
            extra["fields"] = [
                {"field": exc.field, "in": None, "message": exc.detail, "type": "value_error"}
            ]
    headers = None
    if isinstance(exc, errors.RateLimited):
        headers = {"Retry-After": str(exc.retry_after_s)}
    return JSONResponse(
        status_code=status_for(exc), content=_body(exc.code, exc.detail, **extra), headers=headers
    )


async def _integrity_error(_: Request, exc: Exception) -> JSONResponse:
    # A unique constraint lost a race the service's own check could not see (two
    # creates of the same name at once). The constraint name says which.
    constraint = getattr(getattr(getattr(exc, "orig", None), "diag", None), "constraint_name", None)
    log.warning("integrity_error", constraint=constraint)
    return JSONResponse(
        status_code=409,
        content=_body("conflict", "conflicts with an existing record", constraint=constraint),
    )


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    fields = [
        {
            "field": _field_path(err.get("loc", ())),
            "in": err["loc"][0] if err.get("loc") else None,
            "message": err.get("msg", "invalid"),
            "type": err.get("type"),
        }
        for err in exc.errors()
    ]
    first = fields[0] if fields else {"field": "", "message": "invalid request"}
    return JSONResponse(
        status_code=422,
        content=_body("validation_error", f"{first['field']}: {first['message']}", fields=fields),
    )


async def _input_rejected(_: Request, exc: Exception) -> JSONResponse:
    # The middleware refuses these before routing; a route that parses input itself
    # (the raw-body webhook) may still raise one.
    assert isinstance(exc, bodies.InputRejected)
    return JSONResponse(
        status_code=422, content=rejected_body(exc.problem, current_request_id() or "")
    )


async def _dependency_down(_: Request, exc: Exception) -> JSONResponse:
    # Redis or the broker did not answer where the request needed it (a webhook's
    # replay guard, say). Nothing was admitted, so the client may simply retry.
    log.warning("dependency_unavailable", exc_type=type(exc).__name__)
    return JSONResponse(
        status_code=503,
        content=_body("dependency_unavailable", "a backing service did not answer; retry later"),
        headers={"Retry-After": "5"},
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = HTTP_STATUS_CODES.get(
        exc.status_code, "error" if exc.status_code < 500 else "internal_error"
    )
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:
        allow = openapi.allowed_methods(request.app, request.scope["path"])
        if allow:
            headers["Allow"] = allow
    return JSONResponse(
        status_code=exc.status_code,
        content=_body(code, str(exc.detail)),
        headers=headers or None,
    )


# Collections of the youngest generation: one per this many new container objects
# (Python's default: 700). An authenticated request allocates thousands, so under load
# the default collected hundreds of times a second and promoted what the requests in
# flight held into the older generations, which were then collected again and again.
GC_YOUNG_THRESHOLD = 10_000
_gc_tuned = False


def _tune_gc() -> None:
    """Once the app has started: move what start-up built (the imported app, its models
    and routes, ~300k objects that live as long as the process) out of the collector's
    reach with gc.freeze, and collect the youngest generation less often. Measured under
    wrk (issue 20): garbage collection took ~15 % of the API process's CPU before (a full
    collection walked the whole heap, ~150 ms, every few hundred requests), ~3 % after.
    Once per process: a lifespan that starts again (tests start one per client) would
    pay a full collection each time and freeze whatever happened to be alive then."""
    global _gc_tuned
    if _gc_tuned:
        return
    _gc_tuned = True
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def create_app(settings: Settings | None = None, *, celery: Celery | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Connections kept, not opened and closed with the load (db.create_engine).
        engine = create_engine(settings, keep_connections=True)
        redis = Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.redis.socket_timeout_s,
            socket_connect_timeout=settings.redis.socket_connect_timeout_s,
        )
        app.state.settings = settings
        app.state.engine = engine
        app.state.sessionmaker = create_sessionmaker(engine)
        app.state.redis = redis
        app.state.celery = celery or celery_app
        app.state.limiter = RateLimiter(
            settings.redis_url,
            timeout_s=settings.redis.socket_timeout_s,
            connect_timeout_s=settings.redis.socket_connect_timeout_s,
        )
        # Pub/sub waits on its socket indefinitely: no read timeout on this client.
        hub_redis = Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=settings.redis.socket_connect_timeout_s,
            health_check_interval=30,
        )
        app.state.hub = Hub(
            hub_redis,
            engine,
            poll_s=settings.realtime.poll_s,
            queue_size=settings.realtime.queue_size,
        )
        await app.state.hub.start()
        app.state.hot = await hotpath.open_state(settings, engine, app.state.sessionmaker)
        _tune_gc()
        try:
            yield
        finally:
            if app.state.hot is not None:
                await app.state.hot.pool.close()
            await app.state.hub.stop()
            await hub_redis.aclose()
            await redis.aclose()
            await engine.dispose()

    app = FastAPI(
        title=settings.app_name,
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs",
        openapi_url="/openapi.json",
        # FastAPI's own request telemetry asks the OpenTelemetry API for three global
        # providers on every request (environment lookups included) to learn that none
        # is set. Traces are the only part we use, and only with an OTLP endpoint
        # (observability/tracing.py); metrics are Prometheus, logs structlog.
        telemetry={"tracing": tracing.wanted(), "metrics": False, "logs": False},
    )
    if not tracing.wanted():
        # Innermost of the middleware: CORS, metrics and the request context wrap the
        # hot reads' answers as they wrap the routes'. Off with tracing: FastAPI's own
        # request spans are the traces, and these requests would have none.
        app.add_middleware(hotpath.HotReads, routes=HOT_ROUTES, prefix=API_PREFIX)
    if settings.security.cors_origins:
        origins = settings.security.cors_origins
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            # Credentials are never combined with a wildcard origin.
            allow_credentials="*" not in origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID"],
        )
    # Inside the request context, so its 500s are counted as 500s.
    observability_api.install(app, settings)
    # Added last so it is the outermost layer: CORS answers carry its headers too.
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.security.max_body_bytes,
        hsts=settings.environment == "production",
    )
    app.add_exception_handler(errors.DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(IntegrityError, _integrity_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(bodies.InputRejected, _input_rejected)
    for unavailable in (RedisConnectionError, RedisTimeoutError, BrokerUnavailable):
        app.add_exception_handler(unavailable, _dependency_down)

    app.include_router(health_router)
    # The console's static pages, outside /api/v1 and the OpenAPI document.
    app.include_router(console_router)
    routers = (
        # The hot routes first: FastAPI finds a request's route by trying each one in
        # order (~5 us each), and POST /executions sat behind ~75 others (~0.4 ms of
        # CPU per request). None of the routers they now precede serves a path under
        # /workflows or /executions (tests/test_route_order.py checks every route still
        # answers its own paths).
        # Before workflows: /workflows/generate must not be read as a workflow id.
        generate_router,
        workflows_router,
        executions_router,
        auth_router,
        workspaces_router,
        quotas_router,
        api_keys_router,
        invitations_router,
        suggestions_router,
        templates_router,
        credentials_router,
        agents_router,
        realtime_router,
        analytics_router,
        analytics_sockets,
        triggers_router,
        n8n_hooks_router,
        hooks_router,
        mcp_router,
        n8n_router,
        n8n_promotions_router,
        files_router,
        tools_router,
        tasks_router,
        task_links_router,
        notifications_router,
    )
    for router in routers:
        app.include_router(router, prefix=API_PREFIX)
    openapi.install(app, API_PREFIX)
    return app


app = create_app()
