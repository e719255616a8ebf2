"""A run that ends while Redis is down, through a real uvicorn and Celery worker whose
event Redis (a Valkey of the test's own) is killed mid-run and started again: the
connected follower still gets the run's end, from the committed state, and a clean
close; once Redis is back the worker publishes what it kept, in order, so a replay
and a reconnect at the last seq it had both reach the end."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed

from backend.realtime.events import EventLog
from tests.realtime.conftest import Valkey
from tests.realtime.test_streams import bearer, follow, seqs, slow_flow, start, transform, ws_url
from tests.support.crossprocess import wait_until_done, workflow
from tests.support.procs import PYTHON, free_port, http_ok, python_env, running, wait_for
from tests.support.target import Target, http_target

pytestmark = pytest.mark.xdist_group("crossprocess-b")


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    with http_target() as t:
        yield t


@pytest.fixture
def stack(database: str, tmp_path: Path, crossprocess_logs: Path) -> Iterator[tuple[str, Valkey]]:
    """uvicorn and a worker whose events go to a Valkey the test can take away; the
    broker and results live on another one, so tasks still flow meanwhile."""
    events, broker = Valkey(tmp_path / "events"), Valkey(tmp_path / "broker")
    events.start()
    broker.start()
    env = python_env(
        REDIS_URL=events.url,
        CELERY__BROKER_URL=broker.url,
        CELERY__RESULT_BACKEND=broker.url,
        HTTP__ALLOW_PRIVATE_NETWORKS='["127.0.0.1/32"]',
        ENGINE__WATCH_INTERVAL_S="0.1",
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    web_log = crossprocess_logs / f"uvicorn-outage-{port}.log"
    worker_log = crossprocess_logs / f"worker-outage-{port}.log"
    web = [PYTHON, "-m", "uvicorn", "backend.main:app", "--host", "127.0.0.1", "--port", str(port)]
    # One process: the run that ended during the outage and the next one share a loop.
    worker = [PYTHON, "-m", "celery", "-A", "workers", "worker", "--loglevel=INFO",
              "--queues=high_priority,default", "--concurrency=1", "--without-mingle",
              "--without-gossip", f"--hostname=outage-{port}@127.0.0.1"]  # fmt: skip
    try:
        with (
            running(web, env=env, log=web_log) as web_proc,
            running(worker, env=env, log=worker_log) as worker_proc,
        ):
            wait_for(
                http_ok(f"{base}/health"), timeout_s=90, what="uvicorn", proc=web_proc, log=web_log
            )
            wait_for(
                lambda: "ready" in worker_log.read_text(),
                timeout_s=60,
                what="celery worker",
                proc=worker_proc,
                log=worker_log,
            )
            yield base, events
    finally:
        events.kill()
        broker.kill()
        import shutil  # DEBUG

        for f in (web_log, worker_log, tmp_path / "events" / "valkey.log"):
            shutil.copy(f, f"/tmp/rt/outage-{f.name}")


async def test_a_run_that_ends_while_redis_is_down_still_reaches_its_followers(
    stack: tuple[str, Valkey], owner: dict[str, str], target: Target
) -> None:
    api, events = stack
    wf = workflow(api, owner, slow_flow(target, 3.0))
    execution_id = start(api, owner, wf)
    messages: list[dict[str, Any]] = []
    waiting = asyncio.Event()

    async def follower() -> int | None:
        path = ws_url(api, f"/api/v1/ws/executions/{execution_id}")
        async with websockets.connect(path) as ws:
            await ws.send(json.dumps({"token": bearer(owner), "resume_from": 0}))
            try:
                while True:
                    body = json.loads(await asyncio.wait_for(ws.recv(), 40))
                    if body.get("type") == "ping":
                        continue
                    messages.append(body)
                    if (body.get("node_id"), body.get("status")) == ("wait", "running"):
                        waiting.set()
            except ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None

    following = asyncio.create_task(follower())
    await asyncio.wait_for(waiting.wait(), 30)
    # Redis goes away while the run waits on its slow call; the run finishes meanwhile.
    events.kill()
    went_down = time.monotonic()
    code = await asyncio.wait_for(following, 60)
    assert code == 1000
    end = messages[-1]
    assert (end["type"], end["status"]) == ("execution.status", "completed")
    assert end["data"]["output"] == {"last": {"f0": 0, "f1": 1, "f2": 2}}
    # From the committed state (the row), within the quiet check's reach.
    assert time.monotonic() - went_down < 25
    had = [m["seq"] for m in messages[:-1]]
    assert had == list(range(1, len(had) + 1))
    assert end["seq"] == had[-1] + 1

    # Redis is back. The worker kept what it could not publish; its loop runs again
    # with the next run, and the kept events go out in order behind the ones before.
    events.start()
    quick = {
        "nodes": [
            {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
            transform("a", "1"),
        ],
        "connections": [{"source": "start", "target": "a"}],
    }
    other = start(api, owner, workflow(api, owner, quick))
    wait_until_done(api, owner, other)
    redis = Redis.from_url(events.url)
    log = EventLog(redis)
    run = uuid.UUID(execution_id)
    for _ in range(200):
        if await log.end_seq(run) is not None:
            break
        await asyncio.sleep(0.1)
    await redis.aclose()

    replay, code = await follow(api, owner, execution_id, resume_from=0)
    assert code == 1000
    numbers = seqs(replay)
    assert numbers == list(range(1, len(numbers) + 1))
    kinds = [(m["type"], m.get("node_id"), m.get("status")) for m in replay]
    for node in ("f0", "f1", "f2", "last"):
        assert ("node.status", node, "completed") in kinds, node
    assert kinds[-1] == ("execution.status", None, "completed")
    assert [k for k in kinds if k[0] == "execution.status" and k[2] == "completed"] == [kinds[-1]]

    # A reconnect at the last seq it had gets what it missed, the end last, and a close.
    rest, code = await follow(api, owner, execution_id, resume_from=had[-1])
    assert code == 1000
    assert seqs(rest) == list(range(had[-1] + 1, numbers[-1] + 1))
    assert rest[-1]["status"] == "completed"
    async with httpx.AsyncClient(timeout=10) as client:
        body = (await client.get(f"{api}/api/v1/executions/{execution_id}", headers=owner)).json()
    assert body["status"] == "completed"
