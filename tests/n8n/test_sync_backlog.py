"""Sync against bursts and beat: a burst larger than N8N__MAX_EXECUTION_PAGES pages is
not skipped (the next syncs continue where the last stopped, and the answer says more is
pending); `n8n.sync_due`, sent as beat sends it, syncs a due instance in the session's
real Celery worker; the n8n daily quotas are the operator's, which a workspace's
administrators may lower but not lift."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import create_engine, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from backend.config import Settings
from backend.models import N8nExecution, N8nInstance, N8nWorkflow, Workspace, WorkspaceQuota
from tests.n8n.conftest import n8n_settings
from tests.n8n.standin import StandIn, running
from tests.n8n.test_instances import URL, connect, refresh
from tests.support.asgi import client_for
from tests.support.identity import Actor


@pytest.fixture
def api(uvicorn_api: str) -> str:
    """The real uvicorn (this package's own `api` is an in-process client)."""
    return uvicorn_api


@pytest.fixture(scope="module")
def burst_server() -> Iterator[StandIn]:
    with running() as s:
        yield s


@pytest.fixture
def burst(burst_server: StandIn) -> Iterator[StandIn]:
    burst_server.reset()
    yield burst_server
    assert burst_server.violations == []


@pytest.fixture
async def small_pages(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]
) -> AsyncIterator[httpx.AsyncClient]:
    """An API whose syncs read at most 2 pages of 2 executions each."""
    from backend.main import create_app

    local = n8n_settings(settings)
    local = local.model_copy(
        update={"n8n": local.n8n.model_copy(update={"max_execution_pages": 2})}
    )
    app: FastAPI = create_app(local)
    async for c in client_for(app, sessionmaker):
        yield c


async def test_a_burst_past_the_page_cap_is_read_by_the_next_syncs_not_skipped(
    small_pages: httpx.AsyncClient, editor: Actor, burst: StandIn, session: AsyncSession
) -> None:
    wf = burst.add_workflow("Busy")
    now = datetime.now(UTC)
    # Oldest first, as n8n numbers them; n8n lists the newest first.
    made = [
        burst.add_execution(wf["id"], "error" if i % 3 == 0 else "success",
                            started=now - timedelta(minutes=30 - i), error="x", node="n")
        for i in range(11)
    ]  # fmt: skip
    iid = (await connect(small_pages, editor, burst))["id"]

    async def held() -> set[str]:
        rows = await session.scalars(
            select(N8nExecution.n8n_id).where(N8nExecution.instance_id == uuid.UUID(iid))
        )
        return set(rows.all())

    first = await refresh(small_pages, editor, iid)
    # 2 pages of 2: the 4 newest; the 7 older ones are pending, not lost.
    assert first["executions"] == 4 and first["executions_pending"] is True
    assert await held() == {e["id"] for e in made[7:]}
    backlog = first["instance"]["capabilities"]["execution_backlog"]
    assert len(backlog) == 1 and backlog[0]["cursor"]
    # New executions meanwhile are read first; the gap continues from its cursor.
    newer = burst.add_execution(wf["id"], "success", started=now - timedelta(minutes=1))
    second = await refresh(small_pages, editor, iid)
    assert second["executions_pending"] is True
    assert {newer["id"], *(e["id"] for e in made[4:])} <= await held()
    assert made[0]["id"] not in await held()
    third = await refresh(small_pages, editor, iid)
    assert third["executions_pending"] is False
    assert third["instance"]["capabilities"]["execution_backlog"] == []
    assert third["instance"]["capabilities"]["executions_skipped"] == 0
    assert await held() == {newer["id"], *(e["id"] for e in made)}


async def test_admins_lower_the_n8n_quotas_but_never_lift_the_operators(
    small_pages: httpx.AsyncClient,
    editor: Actor,
    burst: StandIn,
    session: AsyncSession,
    team: Workspace,
) -> None:
    iid = (await connect(small_pages, editor, burst))["id"]
    session.add(WorkspaceQuota(workspace_id=team.id, limits={"n8n_refreshes_per_day": 2}))
    # The workspace's own setting asks for more than the operator allows: ignored.
    team.settings = {"quotas": {"n8n_refreshes_per_day": 1000}}
    await session.flush()
    await refresh(small_pages, editor, iid)
    await refresh(small_pages, editor, iid)
    r = await small_pages.post(f"{URL}/{iid}/refresh", headers=editor.headers)
    assert r.status_code == 402 and r.json()["quota"] == "n8n_refreshes_per_day"
    assert r.json()["limit"] == 2 and r.json()["used"] == 2
    usage = await small_pages.get(f"/api/v1/workspaces/{team.id}/usage", headers=editor.headers)
    (row,) = [q for q in usage.json()["quotas"] if q["quota"] == "n8n_refreshes_per_day"]
    assert (row["limit"], row["used"], row["exceeded"]) == (2, 2, True)
    # Lower than the operator's: that one counts.
    team.settings = {"quotas": {"n8n_toggles_per_day": 0}}
    await session.flush()
    await refresh_workflows(session, iid, burst)
    r = await small_pages.post(f"{URL}/{iid}/workflows/wfx/toggle", headers=editor.headers,
                               json={"active": True})  # fmt: skip
    assert r.status_code == 402 and r.json()["quota"] == "n8n_toggles_per_day"
    assert not [c for c in burst.calls if c.path.endswith("/publish")]


async def refresh_workflows(session: AsyncSession, iid: str, standin: StandIn) -> None:
    """A synced workflow row without spending a refresh."""
    instance = await session.get(N8nInstance, uuid.UUID(iid))
    assert instance is not None
    session.add(
        N8nWorkflow(id=uuid.uuid4(), workspace_id=instance.workspace_id, instance_id=instance.id,
                    n8n_id="wfx", name="X", active=False, tags=[], node_count=1, definition={})
    )  # fmt: skip
    await session.flush()


@pytest.mark.xdist_group("crossprocess")
@pytest.mark.usefixtures("worker_name")
def test_beat_sync_due_syncs_a_due_instance_in_a_real_worker(
    api: str,
    owner: dict[str, str],
    burst: StandIn,
    database: str,
) -> None:
    from backend.kit.celery_app import celery_app

    wf = burst.add_workflow("Nightly", tags=["ops"])
    burst.add_execution(wf["id"], "error", error="Timeout", node="Fetch")
    r = httpx.post(
        f"{api}/api/v1/n8n/instances", headers=owner, timeout=10,
        json={"name": f"n8n-{uuid.uuid4().hex[:6]}", "base_url": burst.base,
              "api_key": burst.api_key},
    )  # fmt: skip
    assert r.status_code == 201, r.text
    iid = uuid.UUID(r.json()["id"])
    # As beat sends it: by name, through the broker, to the worker.
    celery_app.send_task("n8n.sync_due")
    engine = create_engine(database.replace("postgresql://", "postgresql+psycopg://", 1))
    deadline = time.monotonic() + 60
    try:
        while True:
            with Session(engine) as s:
                row = s.get(N8nInstance, iid)
                assert row is not None
                if row.last_synced_at is not None:
                    break
            assert time.monotonic() < deadline, "the instance was not synced by beat's task"
            time.sleep(0.2)
        with Session(engine) as s:
            synced = s.get(N8nInstance, iid)
            assert synced is not None
            assert synced.status == "ok", (synced.status, synced.status_reason)
            names = s.scalars(select(N8nWorkflow.name).where(N8nWorkflow.instance_id == iid))
            assert list(names) == ["Nightly"]
            failed = s.scalar(
                select(func.count()).where(
                    N8nExecution.instance_id == iid, N8nExecution.error_message == "Timeout"
                )
            )
            assert failed == 1
    finally:
        engine.dispose()
    # The worker read the instance with its key, as n8n's spec says.
    assert any(c.path == "/api/v1/workflows" for c in burst.calls)
