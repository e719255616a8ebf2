"""The event log across a Redis outage, against a real Valkey that goes away and comes
back: what Redis did not take is kept and published in order once it answers, the run's
end included and never dropped; a run ends once; seqs never go back."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from redis.asyncio import Redis

from backend.realtime import events as ev
from backend.realtime.events import (
    EXECUTION_STATUS,
    NODE_STATUS,
    EventLog,
    event,
    seq_key,
    stream_key,
)
from tests.realtime.conftest import Valkey


def node(run: uuid.UUID, node_id: str, status: str) -> str:
    return event(NODE_STATUS, run, node_id=node_id, status=status)


async def until_sent(log: EventLog, run: uuid.UUID) -> None:
    for _ in range(300):
        if not log.unsent(run):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{log.unsent(run)} events still kept")


async def test_events_redis_did_not_take_go_out_in_order_once_it_is_back(valkey: Valkey) -> None:
    client = Redis.from_url(valkey.url, socket_connect_timeout=0.5, socket_timeout=2)
    log = EventLog(client)
    run, workspace = uuid.uuid4(), uuid.uuid4()
    await log.send(run, workspace, [node(run, "a", "running")])
    assert await log.last_seq(run) == 1

    valkey.kill()
    await log.send(run, workspace, [node(run, "a", "completed"), node(run, "b", "running")])
    await log.send(run, workspace, [node(run, "b", "completed")])
    end = event(EXECUTION_STATUS, run, status="completed")
    await log.send(run, workspace, [end], final=True)  # never raises
    assert log.unsent(run) == 4

    valkey.start()
    await until_sent(log, run)
    story = [json.loads(e) for e in await log.read(run, 0)]
    assert [e["seq"] for e in story] == [1, 2, 3, 4, 5]
    assert [(e.get("node_id"), e["status"]) for e in story] == [
        ("a", "running"),
        ("a", "completed"),
        ("b", "running"),
        ("b", "completed"),
        (None, "completed"),
    ]
    assert await log.end_seq(run) == 5

    # A run ends once: a second end (the API's stand-in from the execution row, then
    # the worker's own, re-sent late) appends nothing and answers the first one's seq.
    assert await log.publish(run, workspace, [end], final=True) == 5
    assert await client.xlen(stream_key(run)) == 5

    # A Redis that lost the run's keys does not hand out seqs followers already had.
    await client.delete(seq_key(run), stream_key(run))
    assert await log.publish(run, workspace, [node(run, "c", "running")]) == 6
    await client.aclose()


async def test_what_is_kept_is_bounded_and_the_end_is_never_dropped(
    valkey: Valkey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ev, "KEEP_EVENTS_PER_RUN", 4)
    client = Redis.from_url(valkey.url, socket_connect_timeout=0.5, socket_timeout=2)
    log = EventLog(client)
    run = uuid.uuid4()
    valkey.kill()
    for i in range(10):
        await log.send(run, None, [node(run, f"n{i}", "completed")])
    await log.send(run, None, [event(EXECUTION_STATUS, run, status="failed")], final=True)
    assert log.unsent(run) == 4
    valkey.start()
    await until_sent(log, run)
    story = [json.loads(e) for e in await log.read(run, 0)]
    # The newest three node events and the end, with seqs of their own.
    assert [e.get("node_id") for e in story] == ["n7", "n8", "n9", None]
    assert [e["seq"] for e in story] == [1, 2, 3, 4]
    assert story[-1]["status"] == "failed"
    await client.aclose()
