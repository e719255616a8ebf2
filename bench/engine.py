"""Engine benchmarks through the public API with a real worker (issue: the execution
engine): chain40, fanout40, throughput, and a plain Celery chain of 40 no-op tasks as
the floor, measured in the same run on the same broker."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

RUNS = 5


def owner_headers(db_url: str) -> dict[str, str]:
    from backend.auth import tokens
    from backend.auth.permissions import Role
    from backend.config import get_settings
    from backend.kit.crypto import hash_token
    from backend.models import AuthSession, User, Workspace, WorkspaceMember

    settings = get_settings()
    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with Session(engine) as session:
        user = User(email=f"bench-{uuid.uuid4().hex[:8]}@example.com")
        ws = Workspace(name="Bench", slug=f"bench-{uuid.uuid4().hex[:8]}")
        session.add_all([user, ws])
        session.flush()
        session.add(WorkspaceMember(workspace_id=ws.id, user_id=user.id, role=Role.OWNER.value))
        sid = uuid.uuid4()
        refresh = tokens.issue(settings, user_id=user.id, session_id=sid, type_="refresh")
        session.add(
            AuthSession(
                id=sid,
                user_id=user.id,
                refresh_token_hash=hash_token(refresh),
                expires_at=datetime.now(UTC) + timedelta(hours=2),
            )
        )
        session.commit()
        access = tokens.issue(settings, user_id=user.id, session_id=sid, type_="access")
        headers = {"Authorization": f"Bearer {access}", "X-Workspace-ID": str(ws.id)}
    engine.dispose()
    return headers


def chain(n: int) -> dict[str, Any]:
    nodes: list[dict[str, Any]] = [{"id": "start", "type": "trigger", "config": {"kind": "manual"}}]
    conns, previous, source = [], "start", "trigger.x"
    for i in range(n):
        nodes.append(
            {
                "id": f"n{i}",
                "type": "logic",
                "config": {"kind": "transform", "template": "{{ " + source + " + 1 }}"},
            }
        )
        conns.append({"source": previous, "target": f"n{i}"})
        previous, source = f"n{i}", f"nodes.n{i}.output"
    return {"nodes": nodes, "connections": conns}


def fanout(n: int) -> dict[str, Any]:
    nodes: list[dict[str, Any]] = [{"id": "start", "type": "trigger", "config": {"kind": "manual"}}]
    conns = []
    for i in range(n):
        nodes.append(
            {
                "id": f"p{i}",
                "type": "logic",
                "config": {"kind": "transform", "template": "{{ trigger.x + " + str(i) + " }}"},
            }
        )
        conns += [{"source": "start", "target": f"p{i}"}, {"source": f"p{i}", "target": "total"}]
    total = " + ".join(f"nodes.p{i}.output" for i in range(n))
    nodes.append(
        {
            "id": "total",
            "type": "logic",
            "config": {"kind": "transform", "template": "{{ " + total + " }}"},
        }
    )
    return {"nodes": nodes, "connections": conns}


async def _create(
    client: httpx.AsyncClient, headers: dict[str, str], definition: dict[str, Any]
) -> str:
    r = await client.post(
        "/api/v1/workflows",
        headers=headers,
        json={"name": f"bench {uuid.uuid4().hex[:6]}", **definition},
    )
    r.raise_for_status()
    return str(r.json()["id"])


async def _run_once(
    client: httpx.AsyncClient, headers: dict[str, str], workflow_id: str
) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    r = await client.post(
        "/api/v1/executions",
        headers=headers,
        json={"workflow_id": workflow_id, "trigger_data": {"x": 0}},
    )
    r.raise_for_status()
    execution_id = r.json()["id"]
    while True:
        body = (await client.get(f"/api/v1/executions/{execution_id}", headers=headers)).json()
        if body["status"] in ("completed", "failed", "cancelled"):
            wall = time.perf_counter() - t0
            if body["status"] != "completed":
                raise RuntimeError(f"benchmark run {body['status']}: {body['error']}")
            return wall, body
        await asyncio.sleep(0.002)


def _server_side(body: dict[str, Any]) -> float:
    created = datetime.fromisoformat(body["created_at"])
    finished = datetime.fromisoformat(body["finished_at"])
    return (finished - created).total_seconds()


async def measure(base: str, headers: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        for name, definition in (("chain40", chain(40)), ("fanout40", fanout(40))):
            wf = await _create(client, headers, definition)
            await _run_once(client, headers, wf)  # warm-up: caches, pools, imports
            walls, servers = [], []
            for _ in range(RUNS):
                wall, body = await _run_once(client, headers, wf)
                walls.append(wall)
                servers.append(_server_side(body))
            out[name] = (statistics.median(walls), statistics.median(servers))
        out["throughput"] = await throughput(client, headers, batch=50)
        out["throughput_single"] = await throughput(client, headers, batch=1)
    return out


THROUGHPUT_RUNS = 200


async def _completed(wf: str, count: int) -> None:
    """Until `count` runs of the workflow completed, read straight from PostgreSQL (an
    API request every few ms would itself load the 2-core machine the runs share; the
    Celery floor waits on its result backend the same way)."""
    import psycopg

    url = os.environ["DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://", 1)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while True:
            cur = await conn.execute(
                "SELECT count(*) FROM workflow_executions"
                " WHERE workflow_id = %s AND status = 'completed'",
                (wf,),
            )
            row = await cur.fetchone()
            if row is not None and row[0] >= count:
                return
            await asyncio.sleep(0.01)


async def throughput(
    client: httpx.AsyncClient, headers: dict[str, str], *, batch: int
) -> tuple[float, float]:
    """(runs per second, seconds until every run was admitted): THROUGHPUT_RUNS runs of
    a chain of three computing nodes (every node checkpointed, events published), from
    the first request until the last run completed. `batch` > 1 starts them through
    POST /executions/batch, `batch` 1 one POST /executions each, at most 32 requests in
    flight (a pool of callers; an unbounded burst measures the listen queue)."""
    wf = await _create(client, headers, chain(3))
    await _run_once(client, headers, wf)
    count = THROUGHPUT_RUNS
    gate = asyncio.Semaphore(32)

    async def post(first: int) -> None:
        async with gate:
            body: dict[str, Any]
            if batch == 1:
                body = {"workflow_id": wf, "trigger_data": {"x": first}}
                r = await client.post("/api/v1/executions", headers=headers, json=body)
            else:
                items = [{"trigger_data": {"x": i}} for i in range(first, first + batch)]
                body = {"workflow_id": wf, "items": items}
                r = await client.post("/api/v1/executions/batch", headers=headers, json=body)
            r.raise_for_status()

    async def round_(first: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        await asyncio.gather(*(post(first + i) for i in range(0, count, batch)))
        admitted = time.perf_counter() - t0
        await _completed(wf, first + count + 1)
        return count / (time.perf_counter() - t0), admitted

    # A round of the same shape first, not reported: each worker process then has this
    # version's graph, its pooled connections and their prepared statements, as in
    # steady operation (the plain Celery chains get the same warm-up).
    await round_(0)
    return await round_(count)


def celery_chains(count: int = THROUGHPUT_RUNS) -> float:
    """Chains per second: `count` plain Celery chains of three tasks, each computing
    from the previous one's result, sent at once, until every result is back."""
    from celery import chain as celery_chain

    from backend.kit.celery_app import celery_app

    step = celery_app.signature("system.increment")

    def round_() -> float:
        t0 = time.perf_counter()
        results = [
            celery_chain(step.clone(args=(i,)), step.clone(), step.clone()).apply_async()
            for i in range(count)
        ]
        for i, result in enumerate(results):
            assert result.get(timeout=120) == i + 3
        return count / (time.perf_counter() - t0)

    round_()  # the same warm-up round as the engine's, not reported
    return round_()


def celery_floor() -> float:
    from celery import chain as celery_chain

    from backend.kit.celery_app import celery_app

    noop = celery_app.signature("system.noop")
    celery_chain(*(noop.clone() for _ in range(40))).apply_async().get(timeout=60)
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        celery_chain(*(noop.clone() for _ in range(40))).apply_async().get(timeout=60)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
