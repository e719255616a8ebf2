"""The principal cache (backend/auth/cache.py): what a credential and a membership resolve
to is reused for at most `auth.principal_cache_ttl_s`, and never past a revocation made
through this process.

Changes "from another process" are made here with Core statements on the test's own
connection: they bypass the ORM hooks exactly as another API process's change does (that
process's hooks evict only its own cache), so only the time bound protects us.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import delete, event, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from backend.auth.cache import cache
from backend.auth.permissions import Role
from backend.config import Settings
from backend.models import ApiKey, AuthSession, User, Workspace, WorkspaceMember
from tests.support.asgi import client_for
from tests.support.identity import Actor, make_user, member, sign_in

TTL_S = 1.0
# Scheduling slack on a busy 2-core machine, on top of the bound itself.
SLACK_S = 1.5


@pytest.fixture
def cached_settings(settings: Settings) -> Settings:
    auth = settings.auth.model_copy(update={"principal_cache_ttl_s": TTL_S})
    return settings.model_copy(update={"auth": auth})


@pytest.fixture
async def cached_client(
    cached_settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]
) -> AsyncIterator[httpx.AsyncClient]:
    from backend.main import create_app

    cache.clear()
    async for c in client_for(create_app(cached_settings), sessionmaker):
        yield c
    cache.clear()


async def until(
    check: Callable[[], Awaitable[bool]], *, within_s: float, step_s: float = 0.05
) -> float:
    """Seconds until `check` holds; fails past `within_s`."""
    start = time.monotonic()
    while not await check():
        elapsed = time.monotonic() - start
        assert elapsed <= within_s, f"still not in effect after {elapsed:.2f} s"
        await asyncio.sleep(step_s)
    return time.monotonic() - start


@pytest.fixture
def statements(engine: AsyncEngine) -> Iterator[list[str]]:
    seen: list[str] = []

    def note(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", note)
    yield seen
    event.remove(engine.sync_engine, "before_cursor_execute", note)


async def test_a_cached_principal_skips_the_session_and_membership_queries(
    cached_client: httpx.AsyncClient,
    session: AsyncSession,
    cached_settings: Settings,
    statements: list[str],
) -> None:
    team = Workspace(name="Cache", slug=f"cache-{time.monotonic_ns()}")
    session.add(team)
    await session.flush()
    actor = await member(session, cached_settings, team, Role.VIEWER)
    headers = {**actor.headers, "X-Workspace-ID": str(team.id)}
    first = await cached_client.get("/api/v1/workflows", headers=headers)
    assert first.status_code == 200, first.text
    assert any("FROM sessions" in s for s in statements)
    assert any("workspace_members" in s for s in statements)
    statements.clear()
    second = await cached_client.get("/api/v1/workflows", headers=headers)
    assert second.status_code == 200
    assert not any("FROM sessions" in s or "workspace_members" in s for s in statements)
    # The list itself: one statement, the total riding on the rows (the savepoints are
    # the test harness's rolled-back transaction).
    ours = [s for s in statements if "SAVEPOINT" not in s]
    assert len(ours) == 1, ours


async def test_a_session_revoked_elsewhere_stops_working_within_the_bound(
    cached_client: httpx.AsyncClient, session: AsyncSession, cached_settings: Settings
) -> None:
    actor = await sign_in(session, cached_settings, await make_user(session))
    assert (await cached_client.get("/api/v1/auth/me", headers=actor.headers)).status_code == 200
    await session.execute(
        update(AuthSession)
        .where(AuthSession.id == actor.session_id)
        .values(revoked_at=datetime.now(UTC), revoked_reason="test")
    )

    async def refused() -> bool:
        r = await cached_client.get("/api/v1/auth/me", headers=actor.headers)
        return r.status_code == 401

    assert await until(refused, within_s=TTL_S + SLACK_S) <= TTL_S + SLACK_S
    # And it stays refused: nothing re-caches a revoked session.
    await asyncio.sleep(TTL_S)
    assert await refused()


async def test_sign_out_takes_effect_at_once_in_this_process(
    cached_client: httpx.AsyncClient, session: AsyncSession, cached_settings: Settings
) -> None:
    actor = await sign_in(session, cached_settings, await make_user(session))
    assert (await cached_client.get("/api/v1/auth/me", headers=actor.headers)).status_code == 200
    assert (
        await cached_client.post("/api/v1/auth/logout", headers=actor.headers)
    ).status_code == 204
    assert (await cached_client.get("/api/v1/auth/me", headers=actor.headers)).status_code == 401


async def test_a_disabled_account_stops_within_the_bound(
    cached_client: httpx.AsyncClient, session: AsyncSession, cached_settings: Settings
) -> None:
    actor = await sign_in(session, cached_settings, await make_user(session))
    assert (await cached_client.get("/api/v1/auth/me", headers=actor.headers)).status_code == 200
    await session.execute(update(User).where(User.id == actor.user.id).values(is_active=False))

    async def refused() -> bool:
        r = await cached_client.get("/api/v1/auth/me", headers=actor.headers)
        return r.status_code == 401

    await until(refused, within_s=TTL_S + SLACK_S)


async def _team_with(
    session: AsyncSession, settings: Settings, role: Role
) -> tuple[Workspace, Actor, dict[str, str]]:
    team = Workspace(name="Cache", slug=f"cache-{time.monotonic_ns()}")
    session.add(team)
    await session.flush()
    actor = await member(session, settings, team, role)
    return team, actor, {**actor.headers, "X-Workspace-ID": str(team.id)}


async def test_a_member_removed_elsewhere_loses_access_within_the_bound(
    cached_client: httpx.AsyncClient, session: AsyncSession, cached_settings: Settings
) -> None:
    team, actor, headers = await _team_with(session, cached_settings, Role.EDITOR)
    assert (await cached_client.get("/api/v1/workflows", headers=headers)).status_code == 200
    await session.execute(
        delete(WorkspaceMember).where(
            WorkspaceMember.workspace_id == team.id, WorkspaceMember.user_id == actor.user.id
        )
    )

    async def outside() -> bool:
        r = await cached_client.get("/api/v1/workflows", headers=headers)
        return r.status_code == 404

    await until(outside, within_s=TTL_S + SLACK_S)


async def test_a_lowered_role_applies_within_the_bound(
    cached_client: httpx.AsyncClient, session: AsyncSession, cached_settings: Settings
) -> None:
    team, actor, headers = await _team_with(session, cached_settings, Role.EDITOR)
    body = {"name": "w", "nodes": [{"id": "s", "type": "trigger", "config": {"kind": "manual"}}]}
    r = await cached_client.post("/api/v1/workflows", headers=headers, json=body)
    assert r.status_code == 201, r.text
    await session.execute(
        update(WorkspaceMember)
        .where(WorkspaceMember.workspace_id == team.id, WorkspaceMember.user_id == actor.user.id)
        .values(role=Role.VIEWER.value)
    )

    async def denied() -> bool:
        r = await cached_client.post("/api/v1/workflows", headers=headers, json=body)
        return r.status_code == 403

    await until(denied, within_s=TTL_S + SLACK_S)


async def test_a_member_removed_through_the_api_loses_access_at_once(
    cached_client: httpx.AsyncClient, session: AsyncSession, cached_settings: Settings
) -> None:
    team, actor, headers = await _team_with(session, cached_settings, Role.EDITOR)
    admin = await member(session, cached_settings, team, Role.OWNER)
    assert (await cached_client.get("/api/v1/workflows", headers=headers)).status_code == 200
    removed = await cached_client.delete(
        f"/api/v1/workspaces/{team.id}/members/{actor.user.id}", headers=admin.headers
    )
    assert removed.status_code == 204, removed.text
    assert (await cached_client.get("/api/v1/workflows", headers=headers)).status_code == 404


async def test_an_api_key_revoked_elsewhere_stops_within_the_bound(
    cached_client: httpx.AsyncClient, session: AsyncSession, cached_settings: Settings
) -> None:
    team, _actor, headers = await _team_with(session, cached_settings, Role.EDITOR)
    made = await cached_client.post(
        f"/api/v1/workspaces/{team.id}/api-keys",
        headers=headers,
        json={"name": "k", "role": "viewer"},
    )
    assert made.status_code == 201, made.text
    key = made.json()["key"]
    assert (
        await cached_client.get("/api/v1/workflows", headers={"X-API-Key": key})
    ).status_code == 200
    await session.execute(
        update(ApiKey).where(ApiKey.workspace_id == team.id).values(revoked_at=datetime.now(UTC))
    )

    async def refused() -> bool:
        r = await cached_client.get("/api/v1/workflows", headers={"X-API-Key": key})
        return r.status_code == 401

    await until(refused, within_s=TTL_S + SLACK_S)


async def test_the_bound_cannot_be_set_past_five_seconds(settings: Settings) -> None:
    with pytest.raises(ValidationError):
        settings.auth.model_validate({**settings.auth.model_dump(), "principal_cache_ttl_s": 6})
    off = settings.auth.model_validate({**settings.auth.model_dump(), "principal_cache_ttl_s": 0})
    assert off.principal_cache_ttl_s == 0


async def test_the_activity_stamp_does_not_evict_what_its_request_cached(
    cached_client: httpx.AsyncClient,
    session: AsyncSession,
    cached_settings: Settings,
    statements: list[str],
) -> None:
    """A request that finds its session's activity stamp a minute old writes it; that
    write alone (nothing else of the session changed) leaves the entry the same request
    just cached, so the next request is a hit. A revocation still evicts (the tests
    above)."""
    actor = await sign_in(session, cached_settings, await make_user(session))
    stale = datetime.now(UTC) - timedelta(minutes=5)
    await session.execute(
        update(AuthSession).where(AuthSession.id == actor.session_id).values(last_activity_at=stale)
    )
    statements.clear()
    first = await cached_client.get("/api/v1/auth/me", headers=actor.headers)
    assert first.status_code == 200, first.text
    assert any("UPDATE sessions SET last_activity_at" in s for s in statements), (
        "the stamp was written"
    )
    statements.clear()
    second = await cached_client.get("/api/v1/auth/me", headers=actor.headers)
    assert second.status_code == 200
    assert not any("FROM sessions" in s for s in statements), "a miss after the stamp"


async def test_a_stamp_and_a_sign_out_in_one_flush_still_evict(
    cached_client: httpx.AsyncClient, session: AsyncSession, cached_settings: Settings
) -> None:
    """Signing out as the first (uncached, stale-stamped) request writes the stamp and
    the revocation together: the entry that request cached is evicted all the same."""
    actor = await sign_in(session, cached_settings, await make_user(session))
    stale = datetime.now(UTC) - timedelta(minutes=5)
    await session.execute(
        update(AuthSession).where(AuthSession.id == actor.session_id).values(last_activity_at=stale)
    )
    out = await cached_client.post("/api/v1/auth/logout", headers=actor.headers)
    assert out.status_code == 204, out.text
    assert (await cached_client.get("/api/v1/auth/me", headers=actor.headers)).status_code == 401
