"""Live progress through a real uvicorn, Redis and Celery worker, with real WebSocket
and SSE clients: every event in order, snapshots for late joiners, resume without
gaps or duplicates (also after the run ended), access refused to outsiders, expired
credentials closed, and a stalled client never holding up another."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from backend.auth import tokens
from backend.config import Settings
from tests.support.crossprocess import signed_in_owner, wait_until_done, workflow
from tests.support.target import Target, http_target

pytestmark = [pytest.mark.xdist_group("crossprocess-b"), pytest.mark.usefixtures("worker_name")]


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    with http_target() as t:
        yield t


def transform(node_id: str, template: str) -> dict[str, Any]:
    return {"id": node_id, "type": "logic", "config": {"kind": "transform", "template": template}}


def slow_flow(target: Target, pause_s: float, fan: int = 3) -> dict[str, Any]:
    """trigger -> a -> wait (an HTTP call that takes pause_s) -> fan transforms -> last."""
    nodes: list[dict[str, Any]] = [
        {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
        {"id": "a", "type": "logic", "config": {"kind": "transform", "template": "1"}},
        {
            "id": "wait",
            "type": "action",
            "config": {"kind": "http_request", "url": f"{target.base}/slow/{pause_s}"},
        },
    ]
    conns = [{"source": "start", "target": "a"}, {"source": "a", "target": "wait"}]
    for i in range(fan):
        nodes.append(transform(f"f{i}", str(i)))
        conns += [{"source": "wait", "target": f"f{i}"}, {"source": f"f{i}", "target": "last"}]
    nodes.append({"id": "last", "type": "logic", "config": {"kind": "merge"}})
    return {"nodes": nodes, "connections": conns}


def start(api: str, headers: dict[str, str], workflow_id: str) -> str:
    r = httpx.post(
        f"{api}/api/v1/executions", headers=headers, json={"workflow_id": workflow_id}, timeout=10
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def ws_url(api: str, path: str) -> str:
    return api.replace("http://", "ws://") + path


def bearer(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


async def follow(
    api: str,
    headers: dict[str, str],
    execution_id: str,
    *,
    resume_from: int | None = None,
    limit: int | None = None,
    via_header: bool = False,
) -> tuple[list[dict[str, Any]], int | None]:
    """(messages, close code): everything the server sent until it closed, or the
    first `limit` messages (then this client hangs up)."""
    path = f"/api/v1/ws/executions/{execution_id}"
    hello: dict[str, Any] = {} if via_header else {"token": bearer(headers)}
    if resume_from is not None:
        hello["resume_from"] = resume_from
    protocols = ["bearer", bearer(headers)] if via_header else None
    messages: list[dict[str, Any]] = []
    async with websockets.connect(ws_url(api, path), subprotocols=protocols) as ws:  # type: ignore[arg-type]
        await ws.send(json.dumps(hello))
        try:
            while limit is None or len(messages) < limit:
                raw = await asyncio.wait_for(ws.recv(), 20)
                body = json.loads(raw)
                if body.get("type") != "ping":
                    messages.append(body)
        except ConnectionClosed as closed:
            return messages, closed.rcvd.code if closed.rcvd else None
    return messages, None


def seqs(messages: list[dict[str, Any]]) -> list[int]:
    return [m["seq"] for m in messages if m.get("type") != "snapshot"]


def assert_contiguous(numbers: list[int], first: int) -> None:
    assert numbers == list(range(first, first + len(numbers))), numbers


async def test_a_client_there_from_the_start_gets_every_event_in_order(
    api: str, owner: dict[str, str], target: Target
) -> None:
    wf = workflow(api, owner, slow_flow(target, 0.5))
    execution_id = start(api, owner, wf)
    messages, code = await follow(api, owner, execution_id, via_header=True)
    assert code == 1000
    snap = messages[0]
    assert snap["type"] == "snapshot" and snap["execution"]["id"] == execution_id
    assert_contiguous(seqs(messages), snap["seq"] + 1)
    last = messages[-1]
    assert (last["type"], last["status"]) == ("execution.status", "completed")
    assert last["data"]["output"] == {"last": {"f0": 0, "f1": 1, "f2": 2}}

    # The full log, replayed from the start: the run's whole story, once each.
    replay, code = await follow(api, owner, execution_id, resume_from=0)
    assert code == 1000
    assert_contiguous(seqs(replay), 1)
    assert (replay[0]["type"], replay[0]["status"]) == ("execution.status", "running")
    node_events = [(m["node_id"], m["status"]) for m in replay if m["type"] == "node.status"]
    for node in ("start", "a", "wait", "f0", "f1", "f2", "last"):
        statuses = [s for n, s in node_events if n == node]
        assert statuses == ["running", "completed"], (node, statuses)
    assert node_events.index(("wait", "completed")) < node_events.index(("f0", "running"))
    assert replay[-1]["status"] == "completed"
    assert {m["execution_id"] for m in replay} == {execution_id}


async def test_a_late_client_gets_a_snapshot_then_the_rest_without_gap_or_duplicate(
    api: str, owner: dict[str, str], target: Target
) -> None:
    wf = workflow(api, owner, slow_flow(target, 1.5))
    execution_id = start(api, owner, wf)
    # Join once the run is under way (a has finished, wait is in its 1.5 s call): on a
    # loaded machine the worker may take a while to pick the run up.
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(200):
            rows = (
                await client.get(f"{api}/api/v1/executions/{execution_id}/nodes", headers=owner)
            ).json()
            if any(r["node_id"] == "a" and r["status"] == "completed" for r in rows):
                break
            await asyncio.sleep(0.05)
    messages, code = await follow(api, owner, execution_id)
    assert code == 1000
    snap = messages[0]
    assert snap["type"] == "snapshot" and snap["seq"] > 0
    done_before = {n["node_id"] for n in snap["nodes"] if n["status"] == "completed"}
    assert {"start", "a"} <= done_before
    numbers = seqs(messages)
    assert_contiguous(numbers, snap["seq"] + 1)
    completed_after = {
        m["node_id"]
        for m in messages[1:]
        if m["type"] == "node.status" and m["status"] == "completed"
    }
    assert done_before | completed_after == {"start", "a", "wait", "f0", "f1", "f2", "last"}
    assert not done_before & completed_after


async def test_resume_misses_nothing_during_the_run_and_after_it(
    api: str, owner: dict[str, str], target: Target
) -> None:
    wf = workflow(api, owner, slow_flow(target, 1.0))
    execution_id = start(api, owner, wf)
    first, _ = await follow(api, owner, execution_id, resume_from=0, limit=3)
    seen = seqs(first)
    assert_contiguous(seen, 1)
    # Reconnect while it still runs: exactly what came after.
    rest, code = await follow(api, owner, execution_id, resume_from=seen[-1])
    assert code == 1000
    assert_contiguous(seqs(rest), seen[-1] + 1)
    total = seqs(rest)[-1]

    # After the end, over SSE: Last-Event-ID gives exactly the remainder, ids = seq.
    with httpx.stream(
        "GET",
        f"{api}/api/v1/executions/{execution_id}/events",
        headers={**owner, "Last-Event-ID": "2"},
        timeout=20,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        body = "".join(response.iter_text())
    ids = [int(line[4:]) for line in body.splitlines() if line.startswith("id: ")]
    assert ids == list(range(3, total + 1))
    data = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
    assert [d["seq"] for d in data] == ids
    assert data[-1]["type"] == "execution.status" and data[-1]["status"] == "completed"

    # And over WebSocket after the end: the tail, then a clean close.
    tail, code = await follow(api, owner, execution_id, resume_from=total - 2)
    assert (seqs(tail), code) == ([total - 1, total], 1000)
    # Resuming at the end of a finished run: nothing more will come, closed at once.
    opened = time.monotonic()
    assert await follow(api, owner, execution_id, resume_from=total) == ([], 1000)
    assert time.monotonic() - opened < 5
    # A fresh SSE client of a finished run gets the snapshot and the stream ends.
    async with httpx.AsyncClient(timeout=20) as client:
        r = await client.get(f"{api}/api/v1/executions/{execution_id}/events", headers=owner)
    assert r.text.startswith("event: snapshot\ndata: ")
    assert json.loads(r.text.split("data: ", 1)[1])["execution"]["status"] == "completed"


async def test_outsiders_are_refused_and_an_expired_token_is_closed(
    api: str, owner: dict[str, str], target: Target, settings: Settings, database: str
) -> None:
    wf = workflow(api, owner, slow_flow(target, 3.0))
    execution_id = start(api, owner, wf)
    # A user of another workspace: the execution does not exist for them.
    stranger = signed_in_owner(database, settings)
    messages, code = await follow(api, stranger, execution_id)
    assert (messages, code) == ([], 4404)
    async with httpx.AsyncClient(timeout=20) as client:
        r = await client.get(f"{api}/api/v1/executions/{execution_id}/events", headers=stranger)
    assert r.status_code == 404
    messages, code = await follow(api, {"Authorization": "Bearer nonsense"}, execution_id)
    assert code == 4401

    # A token that lapses while the socket is open closes it then, with 4401.
    token = bearer(owner)
    claims = tokens.decode(settings, token, expected="access")
    short = settings.model_copy(
        update={"auth": settings.auth.model_copy(update={"access_token_ttl_s": 2})}
    )
    brief = tokens.issue(
        short, user_id=claims.user_id, session_id=claims.session_id, type_="access"
    )
    opened = time.monotonic()
    messages, code = await follow(api, {"Authorization": f"Bearer {brief}"}, execution_id)
    assert code == 4401
    assert 1.0 < time.monotonic() - opened < 5.0
    assert messages[0]["type"] == "snapshot"
    wait_until_done(api, owner, execution_id)


async def test_a_stalled_client_does_not_delay_a_fast_one(
    api: str, owner: dict[str, str], target: Target
) -> None:
    big = "{{ 'x' * 5000 }}"
    body = {"nodes": [transform("blob", big)]}
    loop = {"kind": "for_each", "items": "range(150) | list", "max_concurrency": 10, "body": body}
    wait = {"kind": "http_request", "url": f"{target.base}/slow/0.5"}
    definition = {
        "nodes": [
            {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
            {"id": "wait", "type": "action", "config": wait},
            {"id": "loop", "type": "logic", "config": loop},
        ],
        "connections": [
            {"source": "start", "target": "wait"},
            {"source": "wait", "target": "loop"},
        ],
    }
    execution_id = start(api, owner, workflow(api, owner, definition))
    path = ws_url(api, f"/api/v1/ws/executions/{execution_id}")
    # The stalled client reads nothing after connecting; its library stops reading the
    # socket once one message is buffered, so the server's sends to it back up.
    async with websockets.connect(path, max_queue=1) as stalled:
        await stalled.send(json.dumps({"token": bearer(owner)}))
        started = time.monotonic()
        messages, code = await follow(api, owner, execution_id)
        fast_s = time.monotonic() - started
        assert code == 1000
        assert messages[-1]["status"] == "completed"
        assert_contiguous(seqs(messages), messages[0]["seq"] + 1)
        assert fast_s < 15


async def test_one_socket_carries_runs_workflow_changes_and_live_counters(
    api: str, owner: dict[str, str], target: Target
) -> None:
    workspace_id = owner["X-Workspace-ID"]
    async with websockets.connect(ws_url(api, "/api/v1/ws")) as ws:
        await ws.send(json.dumps({"token": bearer(owner), "workspace_id": workspace_id}))

        async def next_message(pred: Any) -> dict[str, Any]:
            while True:
                body = json.loads(await asyncio.wait_for(ws.recv(), 20))
                if pred(body):
                    return dict(body)

        for channel in ("workflows", "analytics"):
            await ws.send(json.dumps({"action": "subscribe", "channel": channel}))
        counters = await next_message(lambda b: b.get("channel") == "analytics" and "event" in b)
        before = counters["event"]["data"]["completed"]

        wf = await asyncio.to_thread(workflow, api, owner, slow_flow(target, 0.3))
        created = await next_message(lambda b: b.get("channel") == "workflows" and "event" in b)
        assert created["event"]["type"] == "workflow.create"
        assert created["event"]["resource_id"] == wf

        execution_id = await asyncio.to_thread(start, api, owner, wf)
        name = f"executions:{execution_id}"
        await ws.send(json.dumps({"action": "subscribe", "channel": name, "resume_from": 0}))
        events = []
        while True:
            body = await next_message(lambda b: b.get("channel") == name and "event" in b)
            events.append(body["event"])
            if (
                body["event"].get("type") == "execution.status"
                and body["event"]["status"] == "completed"
            ):
                break
        assert_contiguous([e["seq"] for e in events], 1)
        updated = await next_message(
            lambda b: (
                b.get("channel") == "analytics"
                and "event" in b
                and b["event"]["data"]["completed"] > before
            )
        )
        assert updated["event"]["data"]["completed"] == before + 1

        # Mistakes are answered on the socket, which stays open.
        await ws.send(json.dumps({"action": "subscribe", "channel": "nonsense"}))
        error = await next_message(lambda b: b.get("type") == "error")
        assert error["channel"] == "nonsense"
        other = f"executions:{uuid.uuid4()}"
        await ws.send(json.dumps({"action": "subscribe", "channel": other}))
        error = await next_message(lambda b: b.get("type") == "error")
        assert (error["channel"], error["code"]) == (other, "not_found")
        await ws.send(json.dumps({"action": "unsubscribe", "channel": "workflows"}))
        done = await next_message(lambda b: b.get("type") == "unsubscribed")
        assert done["channel"] == "workflows"


def test_only_the_runs_own_last_event_ends_a_stream() -> None:
    from backend.realtime.events import is_terminal

    done = '{"seq":9,"id":"x","type":"execution.status","execution_id":"e","status":"completed"}'
    assert is_terminal(done)
    # A node whose output happens to look like the end does not end anything.
    lookalike = (
        '{"seq":5,"id":"y","type":"node.status","execution_id":"e","node_id":"n",'
        '"status":"completed","data":{"output":{"type":"execution.status","status":"failed"}}}'
    )
    assert not is_terminal(lookalike)


async def test_a_resume_at_the_head_gets_the_end_of_a_run_that_ended_between_two_reads(
    api: str, owner: dict[str, str], database: str
) -> None:
    """The race: a client resumed at the last seq it had just as the run ended. The
    server read the counter (no newer event: the terminal one was still on its way,
    published after the commit), then the execution's status (terminal), and closed
    with 1000 without the end. Here the log is put back in that instant: the run
    completed in PostgreSQL, its terminal event not yet in the stream."""
    import os

    from redis.asyncio import Redis
    from sqlalchemy import create_engine, delete

    from backend.models import ExecutionEvent
    from backend.realtime.events import ARCHIVE_SET, EventLog, end_key, seq_key, stream_key

    quick = {
        "nodes": [
            {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
            transform("a", "{{ 20 + 22 }}"),
        ],
        "connections": [{"source": "start", "target": "a"}],
    }
    execution_id = start(api, owner, workflow(api, owner, quick))
    wait_until_done(api, owner, execution_id)
    redis = Redis.from_url(os.environ["REDIS_URL"])
    log = EventLog(redis)
    run = uuid.UUID(execution_id)
    story = await log.read(run, 0)
    last = json.loads(story[-1])
    assert (last["type"], last["status"]) == ("execution.status", "completed")
    total = last["seq"]
    # The instant between the commit and the publish (nothing archived yet either).
    await redis.delete(stream_key(run))
    for text in story[:-1]:
        await redis.xadd(stream_key(run), {"e": text}, id=f"{json.loads(text)['seq']}-0")
    await redis.set(seq_key(run), total - 1)
    await redis.delete(end_key(run))
    await redis.srem(ARCHIVE_SET, str(run))
    engine = create_engine(database.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        conn.execute(delete(ExecutionEvent).where(ExecutionEvent.execution_id == run))
    engine.dispose()

    messages, code = await follow(api, owner, execution_id, resume_from=total - 1)
    assert code == 1000
    assert [(m["seq"], m["type"], m["status"]) for m in messages] == [
        (total, "execution.status", "completed")
    ]
    assert messages[0]["data"]["output"] == last["data"]["output"]

    # The real one lands late: a run's log takes one end, so it appends nothing.
    late = "{" + story[-1].split(",", 1)[1]
    assert await log.publish(run, uuid.UUID(owner["X-Workspace-ID"]), [late], final=True) == total
    replay = [json.loads(e) for e in await log.read(run, 0)]
    assert [e["seq"] for e in replay] == list(range(1, total + 1))
    assert [e["type"] == "execution.status" and e["status"] == "completed" for e in replay].count(
        True
    ) == 1
    # And a resume at the end is over at once.
    assert await follow(api, owner, execution_id, resume_from=total) == ([], 1000)
    await redis.aclose()
