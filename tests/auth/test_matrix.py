"""Roles x routes, generated from the application's own route table.

Every /api route declares its access through exactly one dependency (PublicRoute,
CurrentUser or require(Permission.X)); a route without one fails here. Each role and
each kind of API key then gets the status the permission matrix says, and a caller
from another workspace gets 404 on every workspace route.
"""

from __future__ import annotations

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
from tests.support.identity import make_workspace, member


@dataclass(frozen=True)
class RouteCase:
    method: str
    path: str
    access: Any  # "public" | "authenticated" | Permission

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def _markers(dependant: Dependant) -> list[Any]:
    found = []
    for dep in dependant.dependencies:
        marker = getattr(dep.call, "__access__", None)
        if marker is not None:
            found.append(marker)
        else:
            found += _markers(dep)
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
        markers = _markers(route.dependant)
        access = markers[0] if len(markers) == 1 else None
        for method in sorted(route.methods or ()):
            cases.append(RouteCase(method, route.path or "", access))
    return cases


CASES = route_cases()
WORKSPACE_CASES = [c for c in CASES if isinstance(c.access, Permission)]
PRIVATE_CASES = [c for c in CASES if c.access != "public"]


def test_every_api_route_declares_exactly_one_access() -> None:
    undeclared = []
    for route in api_routes():
        markers = _markers(route.dependant)
        if len(markers) != 1:
            undeclared.append(f"{sorted(route.methods or ())} {route.path}: {markers}")
    assert undeclared == [], "declare access with PublicRoute, CurrentUser or require(...)"
    # The matrix below is only as good as its coverage.
    assert len(WORKSPACE_CASES) >= 10


def test_workspace_routes_take_the_workspace_from_the_path() -> None:
    for case in WORKSPACE_CASES:
        assert "{workspace_id}" in case.path, case


def _url(case: RouteCase, workspace_id: uuid.UUID) -> str:
    url = case.path.replace("{workspace_id}", str(workspace_id))
    for name in ("user_id", "key_id"):
        url = url.replace("{" + name + "}", str(uuid.uuid4()))
    return url.replace("{token}", new_token())


async def call(
    client: httpx.AsyncClient, case: RouteCase, workspace_id: uuid.UUID, headers: dict[str, str]
) -> httpx.Response:
    body = {} if case.method in ("POST", "PUT", "PATCH") else None
    return await client.request(case.method, _url(case, workspace_id), headers=headers, json=body)


@pytest.fixture
async def workspace(session: AsyncSession) -> Workspace:
    return await make_workspace(session)


@pytest.mark.parametrize("case", PRIVATE_CASES, ids=str)
async def test_no_credentials_is_401(
    client: httpx.AsyncClient, workspace: Workspace, case: RouteCase
) -> None:
    r = await call(client, case, workspace.id, {})
    assert r.status_code == 401, r.text
    assert r.json()["error"] == "unauthenticated"


@pytest.mark.parametrize("role", list(Role), ids=str)
@pytest.mark.parametrize("case", WORKSPACE_CASES, ids=str)
async def test_each_role_gets_what_the_matrix_says(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    workspace: Workspace,
    case: RouteCase,
    role: Role,
) -> None:
    actor = await member(session, settings, workspace, role)
    r = await call(client, case, workspace.id, actor.headers)
    if allows(role, case.access):
        assert r.status_code not in (401, 403), r.text
        if r.status_code == 404:  # a missing sub-resource, never the workspace itself
            assert r.json()["detail"] != "workspace not found"
    else:
        assert r.status_code == 403, r.text
        assert r.json()["error"] == "permission_denied"


@pytest.mark.parametrize("role", list(Role), ids=str)
@pytest.mark.parametrize("case", WORKSPACE_CASES, ids=str)
async def test_each_api_key_role_gets_what_the_matrix_says(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    workspace: Workspace,
    case: RouteCase,
    role: Role,
) -> None:
    creator = await member(session, settings, workspace, Role.OWNER)
    key = new_token("osk_")
    session.add(
        ApiKey(
            workspace_id=workspace.id,
            created_by=creator.user.id,
            name="k",
            prefix=key[:12],
            key_hash=hash_token(key),
            role=role.value,
        )
    )
    await session.flush()
    r = await call(client, case, workspace.id, {"X-API-Key": key})
    if case.access in API_KEY_PERMISSIONS and allows(role, case.access):
        assert r.status_code not in (401, 403), r.text
    else:
        assert r.status_code == 403, r.text


@pytest.mark.parametrize("case", WORKSPACE_CASES, ids=str)
async def test_a_member_of_another_workspace_gets_404(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    workspace: Workspace,
    case: RouteCase,
) -> None:
    elsewhere = await make_workspace(session, "Elsewhere")
    outsider = await member(session, settings, elsewhere, Role.OWNER)
    r = await call(client, case, workspace.id, outsider.headers)
    assert r.status_code == 404, r.text
    assert r.json()["error"] == "not_found"


@pytest.mark.parametrize(
    "case", [c for c in WORKSPACE_CASES if c.access in API_KEY_PERMISSIONS], ids=str
)
async def test_an_api_key_of_another_workspace_gets_404(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    workspace: Workspace,
    case: RouteCase,
) -> None:
    # The key's creator is even an owner of both workspaces: the key is bound to one.
    elsewhere = await make_workspace(session, "Elsewhere")
    creator = await member(session, settings, elsewhere, Role.OWNER)
    from tests.support.identity import add_member

    await add_member(session, workspace, creator.user, Role.OWNER)
    key = new_token("osk_")
    session.add(
        ApiKey(
            workspace_id=elsewhere.id,
            created_by=creator.user.id,
            name="k",
            prefix=key[:12],
            key_hash=hash_token(key),
            role="owner",
        )
    )
    await session.flush()
    r = await call(client, case, workspace.id, {"Authorization": f"Bearer {key}"})
    assert r.status_code == 404, r.text
