"""Batched frames (`?batch=1`) through a real uvicorn, Redis and Celery worker: a
batching follower gets every event exactly once, in seq order, ending with the
terminal event, whatever frames carried them; a follower of the same run that did not
ask still gets one object per frame; a batching resume of a finished run gets its whole
log in one frame; the multiplexed socket batches too."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from backend.realtime.router import BATCH_MAX, frames
from tests.realtime.test_streams import assert_contiguous, bearer, start, transform, ws_url
from tests.support.crossprocess import wait_until_done, workflow
from tests.support.target import Target, http_target

pytestmark = [pytest.mark.xdist_group("crossprocess-b"), pytest.mark.usefixtures("worker_name")]


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    with http_target() as t:
        yield t


def bursty_flow(target: Target, items: int = 40) -> dict[str, Any]:
    """trigger -> wait (0.8 s, so the followers are there) -> a loop of `items` quick
    passes: a burst of events that reaches each follower faster than one at a time."""
    wait = {"kind": "http_request", "url": f"{target.base}/slow/0.8"}
    loop = {
        "kind": "for_each",
        "items": f"range({items}) | list",
        "max_concurrency": 10,
        "body": {"nodes": [transform("item", "{{ 1 }}")]},
    }
    return {
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


async def raw_frames(
    api: str, owner: dict[str, str], execution_id: str, *, batch: bool, resume_from: int = 0
) -> tuple[list[Any], int | None]:
    """(every frame the server sent, parsed, pings left out; the close code)."""
    query = "?batch=1" if batch else ""
    url = ws_url(api, f"/api/v1/ws/executions/{execution_id}{query}")
    received: list[Any] = []
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"token": bearer(owner), "resume_from": resume_from}))
        try:
            while True:
                body = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if not (isinstance(body, dict) and body.get("type") == "ping"):
                    received.append(body)
        except ConnectionClosed as closed:
            return received, closed.rcvd.code if closed.rcvd else None


def flatten(received: list[Any]) -> list[dict[str, Any]]:
    return [item for body in received for item in (body if isinstance(body, list) else [body])]


def assert_whole_run(events: list[dict[str, Any]]) -> None:
    assert_contiguous([e["seq"] for e in events], 1)
    last = events[-1]
    assert (last["type"], last["status"]) == ("execution.status", "completed")


async def test_a_batched_follower_gets_every_event_once_in_order_and_others_objects(
    api: str, owner: dict[str, str], target: Target
) -> None:
    execution_id = start(api, owner, workflow(api, owner, bursty_flow(target)))
    (batched, batched_code), (single, single_code) = await asyncio.gather(
        raw_frames(api, owner, execution_id, batch=True),
        raw_frames(api, owner, execution_id, batch=False),
    )
    assert (batched_code, single_code) == (1000, 1000)

    # The follower that did not ask: one object per frame, as ever.
    assert all(isinstance(body, dict) for body in single)
    assert_whole_run(single)

    # The batching one: objects or arrays of two or more, every event once, in order.
    for body in batched:
        assert isinstance(body, dict) or (isinstance(body, list) and len(body) >= 2), body
    events = flatten(batched)
    assert_whole_run(events)
    assert events == single
    assert len(batched) <= len(events)

    # A batching resume of the finished run: its whole log in one frame, an array.
    replay, code = await raw_frames(api, owner, execution_id, batch=True)
    assert code == 1000
    assert len(replay) == 1 and isinstance(replay[0], list)
    assert replay[0] == single


async def test_a_batched_resume_mid_log_gets_exactly_the_rest(
    api: str, owner: dict[str, str], target: Target
) -> None:
    execution_id = start(api, owner, workflow(api, owner, bursty_flow(target, items=5)))
    wait_until_done(api, owner, execution_id)
    whole, _ = await raw_frames(api, owner, execution_id, batch=False)
    total = whole[-1]["seq"]
    rest, code = await raw_frames(api, owner, execution_id, batch=True, resume_from=total - 1)
    assert code == 1000
    # One event left: it goes as an object, not an array of one.
    assert rest == [whole[-1]]


async def test_the_multiplexed_socket_batches_when_asked(
    api: str, owner: dict[str, str], target: Target
) -> None:
    execution_id = start(api, owner, workflow(api, owner, bursty_flow(target, items=5)))
    wait_until_done(api, owner, execution_id)
    name = f"executions:{execution_id}"
    received: list[Any] = []
    async with websockets.connect(ws_url(api, "/api/v1/ws?batch=1")) as ws:
        await ws.send(json.dumps({"token": bearer(owner)}))
        await ws.send(json.dumps({"action": "subscribe", "channel": name, "resume_from": 0}))
        while True:
            body = json.loads(await asyncio.wait_for(ws.recv(), 30))
            received.append(body)
            if any(m.get("type") == "subscribed" for m in flatten([body])):
                break
    # The backlog and the answer were queued together: they left as one array.
    assert any(isinstance(body, list) for body in received)
    messages = flatten(received)
    events = [m["event"] for m in messages if m.get("channel") == name and "event" in m]
    assert_whole_run(events)
    assert messages[-1] == {"type": "subscribed", "channel": name}


def test_frames_are_arrays_of_at_most_batch_max_and_a_lone_message_is_itself() -> None:
    assert frames(['{"seq":1}']) == ['{"seq":1}']
    assert frames(['{"seq":1}', '{"seq":2}']) == ['[{"seq":1},{"seq":2}]']
    many = [json.dumps({"seq": i}) for i in range(1, BATCH_MAX + 2)]
    out = frames(many)
    assert len(out) == 2
    assert [e["seq"] for e in json.loads(out[0])] == list(range(1, BATCH_MAX + 1))
    assert json.loads(out[1]) == {"seq": BATCH_MAX + 1}
