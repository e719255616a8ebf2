"""The hot reads (backend/kit/hotpath.py): GET /workflows and GET /workflows/{id} answered
without FastAPI's dependency solving when the caches hold the caller, and otherwise left
to the routes. Every request here is sent both ways (hot reads off, then on) and must get
the same answer; `orch_api_hot_reads_total` says which of them answered it.

The hot reads use a pool of their own, so these tests work on committed rows (the app
is not bound to the test's rolled-back transaction; the hot reads are off when it is).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from sqlalchemy import text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.cache import cache
from backend.auth.permissions import Role
from backend.config import Settings
from backend.models import AuthSession
from tests.support.asgi import client_for
from tests.support.identity import Actor, make_workspace, member

TTL_S = 5.0  # the longest the principal cache may hold an entry: the cases run within it


def answered() -> float:
    return REGISTRY.get_sample_value("orch_api_hot_reads_total", {"outcome": "answered"}) or 0.0


def fresh() -> None:
    """Empty the principal cache, so the next request through the route fills it anew:
    an entry is not extended by its hits, and one filled earlier (by the fixture's
    requests, say) may expire between a warm-up and the request that should go hot."""
    cache.clear()


@dataclass
class World:
    app: FastAPI
    client: httpx.AsyncClient
    team: uuid.UUID
    other: uuid.UUID
    owner: Actor
    viewer: Actor
    outsider: Actor
    workflow: str
    foreign_workflow: str
    key: str


def _settings(settings: Settings, **auth: object) -> Settings:
    update_ = {"principal_cache_ttl_s": TTL_S, **auth}
    return settings.model_copy(update={"auth": settings.auth.model_copy(update=update_)})


@pytest.fixture
async def world(
    settings: Settings, maker: async_sessionmaker[AsyncSession]
) -> AsyncIterator[World]:
    from backend.main import create_app

    cached = _settings(settings)
    async with maker() as session:
        team = await make_workspace(session, "Hot")
        other = await make_workspace(session, "Elsewhere")
        owner = await member(session, cached, team, Role.OWNER)
        viewer = await member(session, cached, team, Role.VIEWER)
        outsider = await member(session, cached, other, Role.OWNER)
        await session.commit()
    cache.clear()
    app = create_app(cached)
    async for client in client_for(app):
        assert app.state.hot is not None, "the hot reads are on for an app on its own engine"
        owner.headers["X-Workspace-ID"] = str(team.id)
        outsider.headers["X-Workspace-ID"] = str(other.id)
        definition = {
            "nodes": [{"id": "start", "type": "trigger", "config": {"kind": "manual"}}],
            "connections": [],
        }
        ids = []
        for i, tags in enumerate((["a", "b"], ["b"], [], ["a"])):
            made = await client.post(
                "/api/v1/workflows",
                headers=owner.headers,
                json={"name": f"hot {i}", "tags": tags, **definition},
            )
            assert made.status_code == 201, made.text
            ids.append(made.json()["id"])
        published = await client.patch(
            f"/api/v1/workflows/{ids[1]}/status",
            headers=owner.headers,
            json={"status": "published"},
        )
        assert published.status_code == 200, published.text
        foreign = await client.post(
            "/api/v1/workflows", headers=outsider.headers, json={"name": "theirs", **definition}
        )
        assert foreign.status_code == 201, foreign.text
        made_key = await client.post(
            f"/api/v1/workspaces/{team.id}/api-keys",
            headers=owner.headers,
            json={"name": "hot key", "role": "viewer"},
        )
        assert made_key.status_code == 201, made_key.text
        yield World(
            app,
            client,
            team.id,
            other.id,
            owner,
            viewer,
            outsider,
            ids[0],
            foreign.json()["id"],
            made_key.json()["key"],
        )
    cache.clear()


async def both_ways(world: World, path: str, headers: dict[str, str]) -> tuple[httpx.Response, int]:
    """The route's answer (hot reads off; it also fills the caches), then the answer with
    the hot reads on, checked equal; and how many of the second the hot reads answered."""
    hot = world.app.state.hot
    world.app.state.hot = None
    fresh()
    try:
        slow = await world.client.get(path, headers=headers)
    finally:
        world.app.state.hot = hot
    before = answered()
    fast = await world.client.get(path, headers=headers)
    by_hot = int(answered() - before)
    assert fast.status_code == slow.status_code, (path, fast.text, slow.text)
    if not slow.content:  # (a redirect)
        assert fast.content == b"" and fast.headers.get("location") == slow.headers.get("location")
        return fast, by_hot
    assert fast.json() == slow.json() | (
        {"request_id": fast.json()["request_id"]} if "request_id" in slow.json() else {}
    ), path
    assert fast.headers["content-type"] == slow.headers["content-type"]
    assert sorted(fast.headers.keys()) == sorted(slow.headers.keys()), path
    return fast, by_hot


async def test_hot_reads_answer_exactly_what_the_routes_answer(world: World) -> None:
    owner = world.owner.headers
    token_only = {"Authorization": owner["Authorization"]}
    key = {"X-API-Key": world.key}
    wf = world.workflow
    cases: list[tuple[str, dict[str, str], int, bool]] = [
        # (path, headers, status, answered by the hot reads)
        (f"/api/v1/workflows/{wf}", owner, 200, True),
        (f"/api/v1/workflows/{wf.upper()}", owner, 200, True),
        (f"/api/v1/workflows/{wf}", world.viewer.headers, 200, True),
        (f"/api/v1/workflows/{wf}", key, 200, True),
        (
            f"/api/v1/workflows/{wf}",
            {"authorization": "bearer " + world.owner.access_token},
            200,
            True,
        ),
        (f"/api/v1/workflows/{uuid.uuid4()}", owner, 404, False),
        (f"/api/v1/workflows/{world.foreign_workflow}", owner, 404, False),
        (f"/api/v1/workflows/{world.foreign_workflow}", key, 404, False),
        (f"/api/v1/workflows/{wf}", world.outsider.headers, 404, False),
        (f"/api/v1/workflows/{wf.replace('-', '')}", owner, 200, False),
        ("/api/v1/workflows/not-a-uuid", owner, 422, False),
        (f"/api/v1/workflows/{wf}%0A", owner, 422, False),
        (f"/api/v1/workflows/{wf}/", owner, 307, False),
        (f"/api/v1/workflows/{wf}", {}, 401, False),
        (f"/api/v1/workflows/{wf}", {"Authorization": "Bearer nope"}, 401, False),
        (f"/api/v1/workflows/{wf}", {"X-API-Key": "osk_nope"}, 401, False),
        ("/api/v1/workflows", owner, 200, True),
        ("/api/v1/workflows?limit=2&offset=1", owner, 200, True),
        ("/api/v1/workflows?limit=05", owner, 200, True),
        ("/api/v1/workflows?status=published", owner, 200, True),
        ("/api/v1/workflows?status=archived", owner, 200, True),
        ("/api/v1/workflows?tag=a&sort=name", owner, 200, True),
        ("/api/v1/workflows?sort=-created_at&limit=100", owner, 200, True),
        ("/api/v1/workflows?tag=b&status=draft&sort=updated_at", owner, 200, True),
        ("/api/v1/workflows?offset=1000", owner, 200, False),
        ("/api/v1/workflows?q=hot", owner, 200, False),
        ("/api/v1/workflows?limit=1&limit=3", owner, 200, False),
        ("/api/v1/workflows?limit=%2B3", owner, 200, False),
        ("/api/v1/workflows?limit=0", owner, 422, False),
        ("/api/v1/workflows?limit=101", owner, 422, False),
        ("/api/v1/workflows?offset=2147483648", owner, 422, False),
        ("/api/v1/workflows?status=gone", owner, 422, False),
        ("/api/v1/workflows?sort=id", owner, 422, False),
        ("/api/v1/workflows?tag=" + "x" * 51, owner, 422, False),
        ("/api/v1/workflows", token_only, 422, False),
        ("/api/v1/workflows", {**token_only, "X-Workspace-ID": str(world.other)}, 404, False),
        ("/api/v1/workflows", {**token_only, "X-Workspace-ID": str(world.team).upper()}, 200, True),
        ("/api/v1/workflows", {**owner, "X-Workspace-ID": "nope"}, 422, False),
        (
            "/api/v1/workflows",
            {**world.viewer.headers, "X-Workspace-ID": str(world.team)},
            200,
            True,
        ),
        ("/api/v1/workflows", key, 200, True),
        ("/api/v1/workflows", {**key, "X-Workspace-ID": str(world.team)}, 200, True),
        ("/api/v1/workflows", {**key, "X-Workspace-ID": str(world.other)}, 404, False),
        ("/api/v1/workflows", {**world.outsider.headers}, 200, True),
    ]
    for path, headers, status, by_hot in cases:
        response, count = await both_ways(world, path, headers)
        assert response.status_code == status, (path, response.text)
        assert count == int(by_hot), (
            headers,
            path,
            "answered by the hot reads" if count else "by the route",
        )
    # The list answers carry what the filters select.
    listed, _ = await both_ways(world, "/api/v1/workflows?tag=a&sort=name", owner)
    assert [w["name"] for w in listed.json()["items"]] == ["hot 0", "hot 3"]
    assert listed.json()["total"] == 2


async def test_a_request_a_hot_read_leaves_to_the_route_spends_its_budget_once(
    settings: Settings, maker: async_sessionmaker[AsyncSession]
) -> None:
    """A hot read spends the caller's budget before its statement; when it then leaves the
    request to the route (a workflow it cannot see) the route does not spend it again."""
    from backend.main import create_app

    limited = _settings(settings, api_rate_limit="4 per minute")  # counted one by one
    async with maker() as session:
        team = await make_workspace(session, "Budget")
        owner = await member(session, limited, team, Role.OWNER)
        await session.commit()
    cache.clear()
    async for client in client_for(create_app(limited)):
        headers = {**owner.headers, "X-Workspace-ID": str(team.id)}
        # The first request fills the caches (through the route); the next is answered
        # hot; then two the hot read leaves to the route after spending their budget.
        assert (await client.get("/api/v1/workflows", headers=headers)).status_code == 200
        before = answered()
        assert (await client.get("/api/v1/workflows", headers=headers)).status_code == 200
        assert answered() == before + 1
        for _ in range(2):
            before = answered()
            missing = await client.get(f"/api/v1/workflows/{uuid.uuid4()}", headers=headers)
            assert missing.status_code == 404, missing.text
            assert answered() == before  # left to the route, which answered the 404
        refused = await client.get("/api/v1/workflows", headers=headers)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"] == "rate_limited"
        assert int(refused.headers["retry-after"]) >= 1
    cache.clear()


async def test_a_session_revoked_elsewhere_stops_hot_reads_within_the_bound(
    world: World, maker: async_sessionmaker[AsyncSession]
) -> None:
    path = f"/api/v1/workflows/{world.workflow}"
    headers = world.viewer.headers
    fresh()
    assert (await world.client.get(path, headers=headers)).status_code == 200
    before = answered()
    assert (await world.client.get(path, headers=headers)).status_code == 200
    assert answered() == before + 1
    # As another API process revokes it: a Core statement, no ORM hook evicts here.
    async with maker() as session:
        await session.execute(
            update(AuthSession)
            .where(AuthSession.id == world.viewer.session_id)
            .values(revoked_at=datetime.now(UTC))
        )
        await session.commit()
    revoked_at = time.monotonic()
    while (await world.client.get(path, headers=headers)).status_code == 200:
        assert time.monotonic() - revoked_at <= TTL_S + 1.5, "still answered past the bound"
        await asyncio.sleep(0.05)
    assert (await world.client.get(path, headers=headers)).status_code == 401


async def test_a_dropped_hot_connection_is_answered_by_the_route_and_replaced(
    world: World, maker: async_sessionmaker[AsyncSession]
) -> None:
    """As after a PostgreSQL restart: the hot pool's connections are gone. Each read that
    meets a dead one is answered by the route (same 200), and the pool replaces them."""
    path = f"/api/v1/workflows/{world.workflow}"
    headers = world.owner.headers
    assert (await world.client.get(path, headers=headers)).status_code == 200
    async with maker() as session:
        killed = (
            await session.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name LIKE '% hot' AND datname = current_database()"
                )
            )
        ).scalar_one()
    assert killed >= 1
    size = world.app.state.settings.db.hot_pool_size
    before = answered()
    first = await world.client.get(path, headers=headers)
    assert first.status_code == 200, first.text
    assert answered() == before, "a dead hot connection answered"
    for _ in range(size + 2):
        response = await world.client.get(path, headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["id"] == world.workflow
    before = answered()
    deadline = time.monotonic() + 10
    while answered() == before:
        assert time.monotonic() < deadline, "the hot pool never answered again"
        assert (await world.client.get(path, headers=headers)).status_code == 200
        await asyncio.sleep(0.05)


async def test_hot_requests_are_labelled_with_their_route_in_the_metrics(world: World) -> None:
    path = f"/api/v1/workflows/{world.workflow}"
    template = "/api/v1/workflows/{workflow_id}"
    labels = {"route": template, "method": "GET", "status": "200"}
    fresh()
    await world.client.get(path, headers=world.owner.headers)
    before = REGISTRY.get_sample_value("orch_http_requests_total", labels) or 0.0
    hot_before = answered()
    assert (await world.client.get(path, headers=world.owner.headers)).status_code == 200
    assert answered() == hot_before + 1
    assert REGISTRY.get_sample_value("orch_http_requests_total", labels) == before + 1


def test_every_hot_route_is_a_get_route_of_the_app() -> None:
    """A hot route's template must be a route's: requests it leaves go there, and the
    metrics label them with it."""
    from backend.main import API_PREFIX, HOT_ROUTES, app

    paths = app.openapi()["paths"]
    for hot in HOT_ROUTES:
        assert "get" in paths.get(API_PREFIX + hot.template, {}), hot.template


async def test_under_a_root_path_hot_reads_match_the_routes_paths(world: World) -> None:
    """Behind a proxy that mounts the API under a prefix (uvicorn --root-path), the
    path the routes match is the request's without it; so is the hot reads'."""
    transport = httpx.ASGITransport(app=world.app, root_path="/studio", client=("10.9.8.7", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        path = f"/api/v1/workflows/{world.workflow}"
        for sent in (f"/studio{path}", path):
            fresh()
            await client.get(sent, headers=world.owner.headers)
            before = answered()
            response = await client.get(sent, headers=world.owner.headers)
            assert response.status_code == 200, (sent, response.text)
            assert response.json()["id"] == world.workflow
            assert answered() == before + 1, sent


async def test_a_member_removed_in_this_process_is_refused_at_once(world: World) -> None:
    path = f"/api/v1/workflows/{world.workflow}"
    viewer = world.viewer.headers
    fresh()
    await world.client.get(path, headers=viewer)
    before = answered()
    assert (await world.client.get(path, headers=viewer)).status_code == 200
    assert answered() == before + 1
    removed = await world.client.delete(
        f"/api/v1/workspaces/{world.team}/members/{world.viewer.user.id}",
        headers=world.owner.headers,
    )
    assert removed.status_code == 204, removed.text
    assert (await world.client.get(path, headers=viewer)).status_code == 404
