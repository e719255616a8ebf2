"""Hot reads: the few GET routes a front end polls, answered without FastAPI's routing
and dependency solving or SQLAlchemy's session (issue 20: those were ~60 % of a read's
CPU once its statements were down to one).

A hot route is answered here only when everything it needs is at hand: a credential
the principal cache already holds (the same checks as `authenticate` on a cache hit),
the caller's grant in the workspace cached too, query parameters in their plain form,
and its row found by one statement on a small pool of autocommit connections of its
own (psycopg_pool; `DB__HOT_POOL_SIZE` per process, 0 turns the hot reads off). Its
answer is the route's own (the same service functions and response models build it;
`tests/workflows/test_hot_reads.py` asks every shape both ways and compares). Anything
else falls through to the FastAPI route, which answers it as before: a cache miss (and
then fills the cache), an error of any kind (401, 403, 404, 422, 429: one place formats
errors), a parameter the route would parse differently, a database error (a connection
a PostgreSQL restart dropped is discarded by the pool; the route answers on its own
connections), no free hot connection within CONNECTION_WAIT_S. So a hot route never
answers differently, only sooner. (A statement that ran into DB__STATEMENT_TIMEOUT_MS
fails as the route's would, with a 500, instead of being run a second time.)

The per-caller API budget is spent once: here, before the statement, with a mark in the
request's state that `get_principal` reads when the request falls through after it.

Off when tracing is on (FastAPI's own request spans would miss these requests) and when
the app's sessions are bound elsewhere than its engine (the tests' rolled-back
transactions: rows only those transactions can see).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import psycopg
from fastapi.security.utils import get_authorization_scheme_param
from psycopg.rows import AsyncRowFactory, dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.sql import ClauseElement
from starlette._utils import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from backend.auth.cache import cache as principal_cache
from backend.auth.dependencies import BUDGET_SPENT, CachedCaller, cached_caller, effective_role
from backend.auth.permissions import Permission, Role
from backend.config import Settings
from backend.kit import rawsql
from backend.kit.errors import DomainError, RateLimited
from backend.kit.logging import get_logger
from backend.kit.ratelimit import RateLimiter
from backend.observability import metrics

log = get_logger(__name__)

_ANSWERED = metrics.HOT_READS.labels(outcome="answered")
_LEFT = metrics.HOT_READS.labels(outcome="route")

# A path parameter or header in the one form every parser reads alike (FastAPI and
# Python's uuid accept others, and might not agree on them: those fall through).
UUID_PATTERN = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
# Matched whole (fullmatch): `$` would also match before a final newline, which the
# routes refuse.
_UUID = re.compile(UUID_PATTERN)
_DIGITS = re.compile(r"[0-9]{1,10}")
# How long a hot read waits for one of its connections before leaving the request to
# the route's larger pool (a database that does not answer, or more hot reads in flight
# than the pool has connections): never much slower than the route.
CONNECTION_WAIT_S = 0.25


class FallThrough(Exception):
    """The route answers this request, not the hot path."""


@dataclass(slots=True)
class HotRequest:
    """What a hot handler gets: the caller (from the caches), the path's parameters, the
    query (each name once), the headers, and ways to check access and read rows."""

    scope: Scope
    caller: CachedCaller
    params: dict[str, str]
    query: dict[str, str]
    state: Any

    def header(self, name: bytes) -> str | None:
        """The header's value if it was sent once; a repeated one falls through."""
        found = [value for key, value in self.scope["headers"] if key == name]
        if len(found) > 1:
            raise FallThrough
        return found[0].decode("latin-1") if found else None

    def grant(self, workspace_id: uuid.UUID, permission: Permission) -> Role:
        """The caller's role in `workspace_id` if the cache holds their membership and
        it grants `permission` (authorization as the route's `require` decides it)."""
        principal = self.caller.principal
        cached = principal_cache.grant(principal.user_id, workspace_id)
        if cached is None:
            raise FallThrough
        key = principal.api_key
        try:
            return effective_role(
                Role(cached.role),
                (key["workspace_id"], key["role"]) if key is not None else None,
                workspace_id,
                permission,
            )
        except DomainError:
            raise FallThrough from None

    async def fetch(
        self,
        statement: ClauseElement,
        values: dict[str, Any],
        row_factory: AsyncRowFactory[Any] = dict_row,
    ) -> list[Any]:
        hot: HotState = self.state.hot
        sql = rawsql.compiled(statement, hot.dialect)
        try:
            async with (
                hot.pool.connection(timeout=CONNECTION_WAIT_S) as conn,
                # Binary results: psycopg loads timestamps and UUIDs from them faster
                # than from text (the same Python values).
                conn.cursor(row_factory=row_factory, binary=True) as cursor,
            ):
                await cursor.execute(sql, values)
                return await cursor.fetchall()
        except psycopg.errors.QueryCanceled:
            # DB__STATEMENT_TIMEOUT_MS ran out: the route would run it as long again and
            # fail the same way (a 500); it is not asked to.
            raise
        except (psycopg.Error, PoolTimeout) as exc:
            # A dropped connection is discarded by the pool as it comes back; the route
            # answers this request on its own connections.
            log.info("hotpath.database", error=type(exc).__name__)
            raise FallThrough from None


Handler = Callable[[HotRequest], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class HotRoute:
    # The FastAPI route's path under the API prefix: `{name}` segments are UUIDs.
    template: str
    handler: Handler


def route(template: str, handler: Handler) -> HotRoute:
    """A GET route answered by `handler`, which returns the JSON body of a 200 or
    raises FallThrough."""
    return HotRoute(template, handler)


def _pattern(template: str) -> re.Pattern[str]:
    """Matched with fullmatch (see _UUID)."""
    return re.compile(re.sub(r"\\\{(\w+)\\\}", rf"(?P<\1>{UUID_PATTERN})", re.escape(template)))


@dataclass(slots=True)
class HotState:
    pool: AsyncConnectionPool
    dialect: Any
    # The sessionmaker the app started with: another one (a test's transaction) turns
    # the hot reads off.
    sessionmaker: async_sessionmaker[AsyncSession]


async def open_state(
    settings: Settings, engine: AsyncEngine, sessionmaker: async_sessionmaker[AsyncSession]
) -> HotState | None:
    """The hot reads' pool (None: turned off), opened without waiting for connections
    (a database down at start-up must not hold the API's start; requests fall through
    until it answers)."""
    size = settings.db.hot_pool_size
    if size <= 0:
        return None
    # The same connection arguments SQLAlchemy passes psycopg for this URL (host, port,
    # user, password, database, sslmode...), plus the engine's own options.
    # (Not its adapters map: a Python object, not a connection option.)
    args, kwargs = engine.dialect.create_connect_args(engine.url)
    kwargs.pop("context", None)
    conninfo = psycopg.conninfo.make_conninfo(*args, **kwargs)
    pool: AsyncConnectionPool = AsyncConnectionPool(
        conninfo,
        min_size=size,
        max_size=size,
        open=False,
        name="hot-reads",
        timeout=CONNECTION_WAIT_S,
        kwargs={
            "autocommit": True,
            "options": f"-c statement_timeout={settings.db.statement_timeout_ms}",
            "application_name": f"{settings.app_name[:50]} hot",
        },
    )
    await pool.open(wait=False)
    return HotState(pool=pool, dialect=engine.dialect, sessionmaker=sessionmaker)


class HotReads:
    """The ASGI layer: matches GET requests against the hot routes and answers those it
    can; everything else goes on to the app unchanged."""

    def __init__(self, app: ASGIApp, routes: Sequence[HotRoute], prefix: str = "") -> None:
        self.app = app
        # (the full template, which the metrics layer labels requests with; its pattern)
        self.routes = tuple(
            (_Template(prefix + hot.template), _pattern(prefix + hot.template), hot)
            for hot in routes
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            # The path as the router matches it (without the ASGI root_path).
            path = get_route_path(scope)
            for template, pattern, hot in self.routes:
                matched = pattern.fullmatch(path)
                if matched is not None:
                    body = await self._answer(scope, hot, matched.groupdict())
                    if body is None:
                        _LEFT.inc()
                    else:
                        _ANSWERED.inc()
                        scope["route"] = template
                        await send(
                            {
                                "type": "http.response.start",
                                "status": 200,
                                "headers": [
                                    (b"content-length", str(len(body)).encode()),
                                    (b"content-type", b"application/json"),
                                ],
                            }
                        )
                        await send({"type": "http.response.body", "body": body})
                        return
                    break
        await self.app(scope, receive, send)

    async def _answer(self, scope: Scope, hot: HotRoute, params: dict[str, str]) -> bytes | None:
        state = scope["app"].state
        found: HotState | None = getattr(state, "hot", None)
        if found is None or state.sessionmaker is not found.sessionmaker:
            return None
        try:
            credential = _credential(scope)
            settings: Settings = state.settings
            caller = cached_caller(settings, credential or "")
            if caller is None:
                return None
            query = _query(scope)
            request = HotRequest(scope, caller, params, query, state)
            limiter: RateLimiter = state.limiter
            try:
                await limiter.hit(settings.auth.api_rate_limit, "api", caller.bucket)
            except RateLimited:
                # Refused hits are not counted: the route hits again and answers 429.
                return None
            scope.setdefault("state", {})[BUDGET_SPENT] = True
            return await hot.handler(request)
        except FallThrough:
            return None


@dataclass(frozen=True, slots=True)
class _Template:
    path: str


def _credential(scope: Scope) -> str | None:
    """As `get_principal` reads it: X-API-Key, else a Bearer Authorization (FastAPI's
    HTTPBearer parsing). A repeated header falls through."""
    api_key: list[bytes] = []
    authorization: list[bytes] = []
    for name, value in scope["headers"]:
        if name == b"x-api-key":
            api_key.append(value)
        elif name == b"authorization":
            authorization.append(value)
    if len(api_key) > 1 or len(authorization) > 1:
        raise FallThrough
    if api_key and api_key[0]:
        return api_key[0].decode("latin-1")
    if not authorization:
        return None
    scheme, credentials = get_authorization_scheme_param(authorization[0].decode("latin-1"))
    if not scheme or not credentials or scheme.lower() != "bearer":
        return None
    return credentials


def _query(scope: Scope) -> dict[str, str]:
    """The query string as Starlette reads it, each name at most once."""
    pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    query = dict(pairs)
    if len(query) != len(pairs):
        raise FallThrough
    return query


def uuid_value(value: str | None) -> uuid.UUID:
    if value is None or not _UUID.fullmatch(value):
        raise FallThrough
    return uuid.UUID(value)


def int_value(value: str | None, default: int, low: int, high: int) -> int:
    """A plain decimal within [low, high]; any other form is the route's to parse."""
    if value is None:
        return default
    if not _DIGITS.fullmatch(value):
        raise FallThrough
    number = int(value)
    if not low <= number <= high:
        raise FallThrough
    return number


def choice(value: str | None, allowed: frozenset[str]) -> str | None:
    if value is not None and value not in allowed:
        raise FallThrough
    return value
