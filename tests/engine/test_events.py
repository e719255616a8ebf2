"""What the runner publishes, read back from the real Redis stream and the PostgreSQL
archive: a gap-free story of the run in commit order, node logs, and an agent's text
streamed as a few batched deltas while its output stays the whole message."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.models import ExecutionEvent, Workspace
from backend.realtime.events import event_log, stream_key
from tests.support.definitions import chain, trig
from tests.support.engine import model_runner, start, state
from tests.support.fake_anthropic import fake_anthropic
from tests.support.target import Target
from workers.engine.runner import Runner

pytestmark = pytest.mark.xdist_group("engine")


async def story(maker: async_sessionmaker[AsyncSession], execution_id: uuid.UUID) -> list[Any]:
    events = [json.loads(e) for e in await event_log().read(execution_id, 0)]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    # The archiver (on beat) copies the log of a finished run to PostgreSQL, so replays
    # outlive the stream.
    assert await event_log().archive_pending(maker.kw["bind"]) >= 1
    async with maker() as session:
        archived = (
            await session.scalars(
                select(ExecutionEvent.event)
                .where(ExecutionEvent.execution_id == execution_id)
                .order_by(ExecutionEvent.seq)
            )
        ).all()
    assert list(archived) == events
    return events


async def test_a_run_publishes_its_story_in_order_and_archives_it(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace, target: Target
) -> None:
    definition = chain(3)
    definition["nodes"].append(
        {
            "id": "call",
            "type": "action",
            "config": {"kind": "http_request", "url": f"{target.base}/ok?token=s3cret"},
        }
    )
    definition["connections"].append({"source": "n2", "target": "call"})
    execution_id = await start(maker, workspace, definition, {"x": 1})
    assert await runner.execute(execution_id) == "completed"
    events = await story(maker, execution_id)
    kinds = [(e["type"], e.get("node_id"), e.get("status")) for e in events]
    assert kinds[0] == ("execution.status", None, "running")
    assert kinds[-1] == ("execution.status", None, "completed")
    for node in ("start", "n0", "n1", "n2", "call"):
        mine = [k for k in kinds if k[1] == node and k[0] == "node.status"]
        assert [k[2] for k in mine] == ["running", "completed"], node
    n1_done = next(e for e in events if e.get("node_id") == "n1" and e.get("status") == "completed")
    assert n1_done["data"]["output"] == 3
    log = next(e for e in events if e["type"] == "node.log")
    assert log["node_id"] == "call" and log["data"]["status"] == 200
    assert "s3cret" not in json.dumps(events)
    ex, _ = await state(maker, execution_id)
    assert events[-1]["data"]["output"] == ex.output
    # Once the stream is gone (expired, trimmed), a resume is served from the archive:
    # exactly the events after the seq asked for, seq first as always.
    log = event_log()
    await log.redis.delete(stream_key(execution_id))
    later = await log.read(execution_id, 2, engine=maker.kw["bind"])
    assert [json.loads(e) for e in later] == events[2:]
    assert all(e.startswith('{"seq":') for e in later)


async def test_agent_text_streams_as_batched_deltas(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace
) -> None:
    definition = {
        "nodes": [
            trig(),
            {
                "id": "think",
                "type": "agent",
                "config": {"model": "claude-sonnet-5-5", "prompt": "long answer"},
            },
        ],
        "connections": [{"source": "start", "target": "think"}],
    }
    with fake_anthropic() as (url, requests):
        agent_runner = model_runner(runner, maker, url, "delta-test")
        execution_id = await start(maker, workspace, definition)
        assert await agent_runner.execute(execution_id) == "completed"
    assert requests[0]["body"]["stream"] is True
    _, rows = await state(maker, execution_id)
    text = rows["think"].output["text"]
    assert len(text) == 3000
    # Usage and cost come from the streamed message exactly as from a plain one.
    assert (rows["think"].input_tokens, rows["think"].output_tokens) == (10, 7)
    events = await story(maker, execution_id)
    deltas = [e for e in events if e["type"] == "agent.delta"]
    assert "".join(d["data"]["text"] for d in deltas) == text
    assert [d["data"]["offset"] for d in deltas] == [
        sum(len(x["data"]["text"]) for x in deltas[:i]) for i in range(len(deltas))
    ]
    # ~430 chunks of 7 characters from the model, sent as a handful of events.
    assert 3 <= len(deltas) <= 12
    done = next(e for e in events if e.get("node_id") == "think" and e.get("status") == "completed")
    assert events.index(deltas[-1]) < events.index(done)
