"""Who is calling, and may they do this here? Every API route declares its access with
exactly one of these dependencies, and the route-table test fails a route that does not:

- `PublicRoute`: no credentials (sign-in, webhooks);
- `CurrentUser`: a signed-in person (session token), in no particular workspace;
- `require(Permission.X)`: a person or an API key that holds X in the path's
  `{workspace_id}`. A caller outside the workspace gets 404, never the resource.
"""

from __future__ import annotations

import functools
import inspect
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Header, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth import tokens
from backend.auth.cache import CachedGrant, CachedPrincipal, attach, values_of
from backend.auth.cache import cache as principal_cache
from backend.auth.permissions import API_KEY_PERMISSIONS, Permission, Role, allows
from backend.config import Settings
from backend.kit.crypto import hash_token
from backend.kit.db import UnitOfWork, UnitOfWorkDep
from backend.kit.errors import NotFound, PermissionDenied, Unauthenticated, ValidationFailed
from backend.kit.ratelimit import RateLimiter
from backend.models import ApiKey, AuthSession, User, Workspace, WorkspaceMember

T = TypeVar("T")

API_KEY_PREFIX = "osk_"
# Touching last_activity_at on every request would be a write per request.
ACTIVITY_RESOLUTION = timedelta(seconds=60)

_bearer = HTTPBearer(auto_error=False, description="Access token or API key")


def _same(obj: T) -> T:
    return obj


class Principal:
    """Who is calling. `user` is their row in the request's session; from the principal
    cache it is built (and attached to the session) only when a route first asks for
    it: a hot read needs `user_id` alone, and building the ORM object cost more CPU
    than the rest of the identity check."""

    __slots__ = (
        "_load_user",
        "_user",
        "api_key",
        "cache_ttl_s",
        "expires_at",
        "session_id",
        "user_id",
    )

    def __init__(
        self,
        user: User | None = None,
        session_id: uuid.UUID | None = None,
        api_key: ApiKey | None = None,
        # When the credential lapses (a WebSocket is closed then); None: it does not.
        expires_at: datetime | None = None,
        # How long what was read about this caller's memberships may be reused.
        cache_ttl_s: float = 0.0,
        *,
        user_id: uuid.UUID | None = None,
        load_user: Callable[[], User] | None = None,
    ) -> None:
        if user is not None:
            user_id = user.id
        assert user_id is not None and (user is not None or load_user is not None)
        self._user = user
        self._load_user = load_user
        self.user_id: uuid.UUID = user_id
        self.session_id = session_id
        self.api_key = api_key
        self.expires_at = expires_at
        self.cache_ttl_s = cache_ttl_s

    @property
    def user(self) -> User:
        if self._user is None:
            assert self._load_user is not None
            self._user, self._load_user = self._load_user(), None
        return self._user


class WorkspaceAccess:
    """A granted permission: who, in which workspace, with which role, and (for a
    resource-scoped route) the row it is about. `workspace` is built from the cache
    when first asked for, like Principal.user; `workspace_id` costs nothing."""

    __slots__ = ("_load_workspace", "_workspace", "principal", "resource", "role", "workspace_id")

    def __init__(
        self,
        principal: Principal,
        workspace: Workspace | None = None,
        role: Role = Role.VIEWER,
        # The row a resource-scoped route is about (see require(resource=...)).
        resource: Any = None,
        *,
        workspace_id: uuid.UUID | None = None,
        load_workspace: Callable[[], Workspace] | None = None,
    ) -> None:
        if workspace is not None:
            workspace_id = workspace.id
        assert workspace_id is not None and (workspace is not None or load_workspace is not None)
        self.principal = principal
        self._workspace = workspace
        self._load_workspace = load_workspace
        self.workspace_id: uuid.UUID = workspace_id
        self.role = role
        self.resource = resource

    @property
    def workspace(self) -> Workspace:
        if self._workspace is None:
            assert self._load_workspace is not None
            self._workspace, self._load_workspace = self._load_workspace(), None
        return self._workspace

    @property
    def user(self) -> User:
        return self.principal.user


# async: FastAPI runs a plain `def` dependency in a worker thread, a thread hop on
# every request for a dictionary lookup.
async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_limiter(request: Request) -> RateLimiter:
    limiter: RateLimiter = request.app.state.limiter
    return limiter


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
LimiterDep = Annotated[RateLimiter, Depends(get_limiter)]


def _principal_from(session: AsyncSession, cached: CachedPrincipal) -> Principal:
    sync = session.sync_session
    api_key = attach(sync, ApiKey, cached.api_key) if cached.api_key is not None else None
    return Principal(
        user_id=cached.user_id,
        load_user=functools.partial(attach, sync, User, cached.user),
        session_id=cached.session_id,
        api_key=api_key,
        expires_at=cached.expires_at,
    )


def _cached_key(key_hash: str, now: datetime) -> CachedPrincipal | None:
    cached = principal_cache.principal(f"key:{key_hash}")
    if cached is not None and (cached.expires_at is None or cached.expires_at > now):
        return cached
    return None


def _cached_session(claims: tokens.Claims, now: datetime) -> CachedPrincipal | None:
    cached = principal_cache.principal(f"session:{claims.session_id}")
    if (
        cached is not None
        and cached.user_id == claims.user_id
        and cached.expires_at is not None
        and cached.expires_at > now
    ):
        return cached
    return None


@dataclass(frozen=True, slots=True)
class CachedCaller:
    """Who a credential belongs to, as the principal cache alone knows it."""

    principal: CachedPrincipal
    # The per-caller API budget's key (authenticate's).
    bucket: str


def cached_caller(settings: Settings, credential: str) -> CachedCaller | None:
    """The caller behind `credential` if the principal cache holds them and the
    credential is valid now, checked as `authenticate` checks a cache hit; None for
    anything else (not cached, expired, malformed: `authenticate` decides those). For
    the hot reads (backend/kit/hotpath.py), which answer only what the caches know."""
    if not credential:
        return None
    now = datetime.now(UTC)
    if credential.startswith(API_KEY_PREFIX):
        cached = _cached_key(hash_token(credential), now)
        if cached is None or cached.api_key is None:
            return None
        return CachedCaller(cached, f"key:{cached.api_key['id']}")
    try:
        claims = tokens.decode_access(settings, credential)
    except Unauthenticated:
        return None
    cached = _cached_session(claims, now)
    return CachedCaller(cached, f"user:{cached.user_id}") if cached is not None else None


async def _from_api_key(session: AsyncSession, settings: Settings, key: str) -> Principal:
    key_hash = hash_token(key)
    now = datetime.now(UTC)
    cached = _cached_key(key_hash, now)
    if cached is not None:
        return _principal_from(session, cached)
    # Key and its maker in one round trip.
    row = (
        await session.execute(
            select(ApiKey, User)
            .join(User, User.id == ApiKey.created_by)
            .where(ApiKey.key_hash == key_hash)
        )
    ).first()
    api_key, user = row if row is not None else (None, None)
    if (
        api_key is None
        or user is None
        or api_key.revoked_at is not None
        or (api_key.expires_at is not None and api_key.expires_at <= now)
        or not user.is_active
    ):
        raise Unauthenticated("invalid API key")
    if api_key.last_used_at is None or now - api_key.last_used_at > ACTIVITY_RESOLUTION:
        api_key.last_used_at = now
    principal_cache.put_principal(
        f"key:{key_hash}",
        CachedPrincipal(
            user=values_of(user),
            session_id=None,
            api_key=values_of(api_key),
            expires_at=api_key.expires_at,
        ),
        settings.auth.principal_cache_ttl_s,
    )
    return Principal(user=user, api_key=api_key, expires_at=api_key.expires_at)


async def _from_access_token(session: AsyncSession, settings: Settings, token: str) -> Principal:
    claims = tokens.decode_access(settings, token)
    now = datetime.now(UTC)
    cache_key = f"session:{claims.session_id}"
    cached = _cached_session(claims, now)
    if cached is not None and cached.expires_at is not None:  # (a session's always is)
        principal = _principal_from(session, cached)
        # The token's own expiry may come before the session's.
        principal.expires_at = min(claims.expires_at or cached.expires_at, cached.expires_at)
        return principal
    # Session and user in one round trip.
    row = (
        await session.execute(
            select(AuthSession, User)
            .join(User, User.id == AuthSession.user_id)
            .where(AuthSession.id == claims.session_id)
        )
    ).first()
    auth_session, user = row if row is not None else (None, None)
    if (
        auth_session is None
        or auth_session.user_id != claims.user_id
        or auth_session.revoked_at is not None
        or auth_session.expires_at <= now
    ):
        raise Unauthenticated("session revoked or expired")
    if user is None or not user.is_active:
        raise Unauthenticated("invalid token")
    if now - auth_session.last_activity_at > ACTIVITY_RESOLUTION:
        auth_session.last_activity_at = now
    principal_cache.put_principal(
        cache_key,
        CachedPrincipal(
            user=values_of(user),
            session_id=auth_session.id,
            api_key=None,
            expires_at=auth_session.expires_at,
        ),
        settings.auth.principal_cache_ttl_s,
    )
    expires_at = min(claims.expires_at or auth_session.expires_at, auth_session.expires_at)
    return Principal(user=user, session_id=auth_session.id, expires_at=expires_at)


async def get_principal(
    request: Request,
    uow: UnitOfWorkDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    # Settings, limiter and the X-API-Key header (undocumented, as before) straight from
    # the request: each declared dependency or parameter is a step FastAPI solves on
    # every request (~50 us of CPU each on this path).
    state = request.app.state
    credential = request.headers.get("x-api-key") or (bearer.credentials if bearer else None)
    # A hot read that spent this request's budget and then left the answer to the route
    # (a row it could not see, a grant not cached): the same request is not counted twice.
    spent = bool(request.scope.get("state", {}).get(BUDGET_SPENT))
    return await authenticate(
        uow.session, state.settings, state.limiter, credential, spend_budget=not spent
    )


# Set in the request's scope state by whatever already spent its API budget.
BUDGET_SPENT = "api_budget_spent"


async def authenticate(
    session: AsyncSession,
    settings: Settings,
    limiter: RateLimiter,
    credential: str | None,
    *,
    spend_budget: bool = True,
) -> Principal:
    """Who an access token or API key belongs to (also used by WebSockets, which carry
    their credential in the first message or the subprotocol header)."""
    if not credential:
        raise Unauthenticated("missing credentials: send Authorization: Bearer <token>")
    if credential.startswith(API_KEY_PREFIX):
        principal = await _from_api_key(session, settings, credential)
        bucket = f"key:{principal.api_key.id}" if principal.api_key else ""
    else:
        principal = await _from_access_token(session, settings, credential)
        bucket = f"user:{principal.user_id}"
    principal.cache_ttl_s = settings.auth.principal_cache_ttl_s
    if spend_budget:
        await limiter.hit(settings.auth.api_rate_limit, "api", bucket)
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def current_user(principal: PrincipalDep) -> Principal:
    if principal.api_key is not None:
        raise PermissionDenied("this needs a signed-in person; API keys cannot use it")
    return principal


async def public_route() -> None:
    """Marks a route as open to anyone (it still gets rate limits of its own)."""


current_user.__access__ = "authenticated"  # type: ignore[attr-defined]
public_route.__access__ = "public"  # type: ignore[attr-defined]

CurrentUser = Annotated[Principal, Depends(current_user)]
PublicRoute = Depends(public_route)


async def _membership(
    session: AsyncSession, ttl_s: float, workspace_id: uuid.UUID, user_id: uuid.UUID
) -> tuple[Callable[[], Workspace] | None, Role | None]:
    """The workspace (as a function that gives its row; None: no such workspace) and
    the person's role in it (None: not a member), from the cache or in one round trip.
    Only memberships are cached: someone just added is let in at once. A cached row is
    built only if the route asks for it (WorkspaceAccess.workspace)."""
    cached = principal_cache.grant(user_id, workspace_id)
    if cached is not None:
        load = functools.partial(attach, session.sync_session, Workspace, cached.workspace)
        return load, Role(cached.role)
    row = (
        await session.execute(
            select(Workspace, WorkspaceMember.role)
            .outerjoin(
                WorkspaceMember,
                (WorkspaceMember.workspace_id == Workspace.id)
                & (WorkspaceMember.user_id == user_id),
            )
            .where(Workspace.id == workspace_id)
        )
    ).first()
    if row is None:
        return None, None
    workspace, role = row
    if role is None:
        return functools.partial(_same, workspace), None
    principal_cache.put_grant(
        user_id,
        workspace_id,
        CachedGrant(role=role, workspace=values_of(workspace)),
        ttl_s,
    )
    return functools.partial(_same, workspace), Role(role)


def effective_role(
    member_role: Role | None,
    key: tuple[uuid.UUID, str] | None,
    workspace_id: uuid.UUID,
    permission: Permission,
    not_found: str = "workspace not found",
) -> Role:
    """The role a caller acts with in `workspace_id`, if it grants `permission`: a
    member's own, or for an API key (its workspace and role) the lesser of the key's
    and its maker's. Raises NotFound for an outsider, PermissionDenied for an insider
    without the permission."""
    if key is not None:
        # A key is bound to one workspace, and can never do more than the person
        # who made it can do today.
        key_workspace_id, key_role_name = key
        if key_workspace_id != workspace_id or member_role is None:
            raise NotFound(not_found)
        if permission not in API_KEY_PERMISSIONS:
            raise PermissionDenied(f"API keys cannot use {permission.value}")
        key_role = Role(key_role_name)
        role = key_role if member_role.at_least(key_role) else member_role
    else:
        if member_role is None:
            raise NotFound(not_found)
        role = member_role
    if not allows(role, permission):
        raise PermissionDenied(f"role {role.value} lacks {permission.value}")
    return role


async def _access(
    session: AsyncSession,
    principal: Principal,
    workspace_id: uuid.UUID,
    permission: Permission,
    not_found: str = "workspace not found",
    resource: Any = None,
) -> WorkspaceAccess:
    """The caller's effective role in a workspace, if it grants `permission`.

    Outsiders get NotFound with the same message a missing resource gets, so an id
    reveals nothing; insiders without the permission get PermissionDenied.
    """
    workspace, member_role = await _membership(
        session, principal.cache_ttl_s, workspace_id, principal.user_id
    )
    key = principal.api_key
    role = effective_role(
        member_role,
        (key.workspace_id, key.role) if key is not None else None,
        workspace_id,
        permission,
        not_found,
    )
    if workspace is None:
        raise NotFound(not_found)
    return WorkspaceAccess(
        principal, None, role, resource, workspace_id=workspace_id, load_workspace=workspace
    )


async def _grant(
    session: AsyncSession,
    principal: Principal,
    workspace_id: uuid.UUID,
    permission: Permission,
    not_found: str = "workspace not found",
) -> tuple[Workspace, Role]:
    access = await _access(session, principal, workspace_id, permission, not_found)
    return access.workspace, access.role


# Public for the WebSocket routes, which check access outside FastAPI's dependencies.
grant = _grant


def _kind(model: type[Any]) -> str:
    """'WorkflowExecution' -> 'workflow execution', for messages."""
    return re.sub(r"(?<!^)(?=[A-Z])", " ", model.__name__).lower()


WorkspaceHeader = Annotated[
    uuid.UUID | None,
    Header(alias="X-Workspace-ID", description="The workspace to act in (API keys: their own)"),
]


def require(
    permission: Permission,
    *,
    resource: type[Any] | None = None,
    param: str | None = None,
    scope: str = "path",
    load: Callable[[AsyncSession, uuid.UUID], Awaitable[Any]] | None = None,
) -> Any:
    """A dependency granting `permission` in a workspace, or refusing. The workspace is

    - the path's `{workspace_id}` (scope="path", the default);
    - the `X-Workspace-ID` header, or an API key's own workspace (scope="header"),
      for list and create routes of workspace resources;
    - the workspace of the row `resource` whose id is the path parameter `param`
      (e.g. `require(P.WORKFLOWS_READ, resource=Workflow, param="workflow_id")`); the
      row is handed over as `access.resource`. `load(session, id)` reads it instead of
      `session.get` (a hot route that needs more than the row: one statement, not two);
      whatever it returns needs a `workspace_id`, and None means not found.
    """
    model = resource

    async def session_get(session: AsyncSession, row_id: uuid.UUID) -> Any:
        return await session.get(model, row_id)  # type: ignore[arg-type]

    if resource is not None and scope == "body":
        assert param, "a body-scoped permission names its body field"
        kind = _kind(resource)

        async def by_body(
            request: Request, principal: PrincipalDep, uow: UnitOfWorkDep
        ) -> WorkspaceAccess:
            session = uow.session
            # The id is in the JSON body (POST /executions {workflow_id}); Starlette keeps
            # the body, so the route's own model parses it again without a second read.
            try:
                payload = await request.json()
                resource_id = uuid.UUID(str(payload[param]))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValidationFailed(f"{param} must be the id of a {kind}", field=param) from exc
            row = await (load or session_get)(session, resource_id)
            if row is None:
                raise NotFound(f"{kind} not found")
            return await _access(
                session, principal, row.workspace_id, permission, f"{kind} not found", row
            )

        dependency: Any = by_body
    elif resource is not None:
        assert param, "a resource-scoped permission names its path parameter"
        kind = _kind(resource)

        async def by_resource(
            principal: Principal, uow: UnitOfWork, **path: uuid.UUID
        ) -> WorkspaceAccess:
            session = uow.session
            row = await (load or session_get)(session, path[param])
            if row is None:
                raise NotFound(f"{kind} not found")
            return await _access(
                session, principal, row.workspace_id, permission, f"{kind} not found", row
            )

        # The path parameter's name differs per resource; a signature built here lets
        # FastAPI validate and document it like any declared parameter.
        keyword = inspect.Parameter.KEYWORD_ONLY
        by_resource.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [
                inspect.Parameter(param, keyword, annotation=Annotated[uuid.UUID, Path()]),
                inspect.Parameter("principal", keyword, annotation=PrincipalDep),
                inspect.Parameter("uow", keyword, annotation=UnitOfWorkDep),
            ]
        )
        dependency = by_resource
    elif scope == "header":

        async def by_header(
            principal: PrincipalDep, uow: UnitOfWorkDep, x_workspace_id: WorkspaceHeader = None
        ) -> WorkspaceAccess:
            workspace_id = x_workspace_id or (
                principal.api_key.workspace_id if principal.api_key else None
            )
            if workspace_id is None:
                raise ValidationFailed(
                    "send the workspace in the X-Workspace-ID header", field="X-Workspace-ID"
                )
            return await _access(uow.session, principal, workspace_id, permission)

        dependency = by_header
    else:

        async def by_path(
            workspace_id: Annotated[uuid.UUID, Path()], principal: PrincipalDep, uow: UnitOfWorkDep
        ) -> WorkspaceAccess:
            return await _access(uow.session, principal, workspace_id, permission)

        dependency = by_path

    dependency.__access__ = permission
    dependency.__resource__ = resource
    dependency.__scope__ = "resource" if resource is not None and scope != "body" else scope
    dependency.__param__ = param
    dependency.__name__ = f"require_{permission.value.replace('.', '_')}"
    return Depends(dependency)
