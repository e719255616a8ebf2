"""Roles x routes, generated from the application's own route table.

Every /api route declares its access through exactly one dependency (PublicRoute,
CurrentUser or require(Permission.X, ...)); a route without one fails here. Each role
and each kind of API key then gets the status the permission matrix says, and a caller
from another workspace gets 404 on every workspace route.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.permissions import API_KEY_PERMISSIONS, Permission, Role, allows
from backend.config import Settings
from backend.kit.crypto import hash_token, new_token
from backend.main import API_PREFIX, create_app
from backend.models import ApiKey, Workspace
from tests.support.factories import FACTORIES
from tests.support.identity import add_member, make_workspace, member

NOT_FOUND_DETAILS = (
    "workspace not found",
    "workflow not found",
    "agent not found",
    "credential not found",
    "workflow execution not found",
    "mcp server not found",
    "file not found",
)


@dataclass(frozen=True)
class RouteCase:
    method: str
    path: str
    access: Any  # "public" | "authenticated" | Permission
    scope: str = "path"  # where a permission route finds its workspace
    resource: Any = None
    param: str | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def _declarations(dependant: Dependant) -> list[Any]:
    found = []
    for dep in dependant.dependencies:
        if getattr(dep.call, "__access__", None) is not None:
            found.append(dep.call)
        else:
            found += _declarations(dep)
    return found


def api_routes() -> list[RouteContext]:
    """Every API route with its full path, through included routers (FastAPI resolves
    prefixes lazily, so app.routes alone does not list them)."""
    app = create_app()
    return [
        ctx
        for ctx in iter_route_contexts(app.routes)
        if isinstance(ctx.original_route, APIRoute) and (ctx.path or "").startswith(API_PREFIX)
    ]


def route_cases() -> list[RouteCase]:
    cases = []
    for route in api_routes():
        calls = _declarations(route.dependant)
        call = calls[0] if len(calls) == 1 else None
        for method in sorted(route.methods or ()):
            cases.append(
                RouteCase(
                    method,
                    route.path or "",
                    getattr(call, "__access__", None),
                    getattr(call, "__scope__", "path"),
                    getattr(call, "__resource__", None),
                    getattr(call, "__param__", None),
                )
            )
    return cases


CASES = route_cases()
WORKSPACE_CASES = [c for c in CASES if isinstance(c.access, Permission)]
PRIVATE_CASES = [c for c in CASES if c.access != "public"]


def test_every_api_route_declares_exactly_one_access() -> None:
    undeclared = [
        f"{sorted(route.methods or ())} {route.path}: {_declarations(route.dependant)}"
        for route in api_routes()
        if len(_declarations(route.dependant)) != 1
    ]
    assert undeclared == [], "declare access with PublicRoute, CurrentUser or require(...)"
    # The matrix below is only as good as its coverage.
    assert len(WORKSPACE_CASES) >= 20


def test_every_permission_route_knows_where_its_workspace_is() -> None:
    for case in WORKSPACE_CASES:
        if case.scope == "path":
            assert "{workspace_id}" in case.path, case
        elif case.scope in ("resource", "body"):
            assert case.resource in FACTORIES, f"{case}: add a factory for {case.resource}"
        else:
            assert case.scope == "header", case


@dataclass
class Target:
    workspace: Workspace
    resources: dict[Any, uuid.UUID]


def _url(case: RouteCase, target: Target) -> str:
    url = case.path.replace("{workspace_id}", str(target.workspace.id))
    resource_id = target.resources.get(case.resource)
    if resource_id is not None:
        url = re.sub(r"\{[a-z_]+_id\}", str(resource_id), url, count=1)
    for name in ("user_id", "key_id"):
        url = url.replace("{" + name + "}", str(uuid.uuid4()))
    return url.replace("{token}", new_token()).replace("{number}", "1")


async def call(
    client: httpx.AsyncClient, case: RouteCase, target: Target, headers: dict[str, str]
) -> httpx.Response:
    body: dict[str, Any] | None = {} if case.method in ("POST", "PUT", "PATCH") else None
    if case.scope == "body" and case.param:
        body = {case.param: str(target.resources[case.resource])}
    if case.scope == "header" and "X-Workspace-ID" not in headers:
        headers = {**headers, "X-Workspace-ID": str(target.workspace.id)}
    return await client.request(case.method, _url(case, target), headers=headers, json=body)


@pytest.fixture
async def target(session: AsyncSession) -> Target:
    workspace = await make_workspace(session)
    resources = {
        model: (await factory(session, workspace)).id for model, factory in FACTORIES.items()
    }
    return Target(workspace, resources)


async def api_key(
    session: AsyncSession, workspace: Workspace, creator_id: uuid.UUID, role: Role
) -> str:
    key = new_token("osk_")
    session.add(
        ApiKey(
            workspace_id=workspace.id,
            created_by=creator_id,
            name="k",
            prefix=key[:12],
            key_hash=hash_token(key),
            role=role.value,
        )
    )
    await session.flush()
    return key


@pytest.mark.parametrize("case", PRIVATE_CASES, ids=str)
async def test_no_credentials_is_401(
    client: httpx.AsyncClient, target: Target, case: RouteCase
) -> None:
    r = await call(client, case, target, {})
    assert r.status_code == 401, r.text
    assert r.json()["error"] == "unauthenticated"


@pytest.mark.parametrize("role", list(Role), ids=str)
@pytest.mark.parametrize("case", WORKSPACE_CASES, ids=str)
async def test_each_role_gets_what_the_matrix_says(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    target: Target,
    case: RouteCase,
    role: Role,
) -> None:
    actor = await member(session, settings, target.workspace, role)
    r = await call(client, case, target, actor.headers)
    if allows(role, case.access):
        assert r.status_code not in (401, 403), r.text
        if r.status_code == 404:  # a missing sub-resource, never the workspace or the resource
            assert r.json()["detail"] not in NOT_FOUND_DETAILS
    else:
        assert r.status_code == 403, r.text
        assert r.json()["error"] == "permission_denied"


@pytest.mark.parametrize("role", list(Role), ids=str)
@pytest.mark.parametrize("case", WORKSPACE_CASES, ids=str)
async def test_each_api_key_role_gets_what_the_matrix_says(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    target: Target,
    case: RouteCase,
    role: Role,
) -> None:
    creator = await member(session, settings, target.workspace, Role.OWNER)
    key = await api_key(session, target.workspace, creator.user.id, role)
    r = await call(client, case, target, {"X-API-Key": key})
    if case.access in API_KEY_PERMISSIONS and allows(role, case.access):
        assert r.status_code not in (401, 403), r.text
    else:
        assert r.status_code == 403, r.text


@pytest.mark.parametrize("case", WORKSPACE_CASES, ids=str)
async def test_a_member_of_another_workspace_gets_404(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    target: Target,
    case: RouteCase,
) -> None:
    elsewhere = await make_workspace(session, "Elsewhere")
    outsider = await member(session, settings, elsewhere, Role.OWNER)
    r = await call(client, case, target, outsider.headers)
    assert r.status_code == 404, r.text
    assert r.json()["error"] == "not_found"


@pytest.mark.parametrize(
    "case", [c for c in WORKSPACE_CASES if c.access in API_KEY_PERMISSIONS], ids=str
)
async def test_an_api_key_of_another_workspace_gets_404(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    target: Target,
    case: RouteCase,
) -> None:
    # The key's creator is even an owner of both workspaces: the key is bound to one.
    elsewhere = await make_workspace(session, "Elsewhere")
    creator = await member(session, settings, elsewhere, Role.OWNER)
    await add_member(session, target.workspace, creator.user, Role.OWNER)
    key = await api_key(session, elsewhere, creator.user.id, Role.OWNER)
    r = await call(client, case, target, {"Authorization": f"Bearer {key}"})
    assert r.status_code == 404, r.text
