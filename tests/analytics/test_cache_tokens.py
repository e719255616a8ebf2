"""Cache tokens from the model to analytics: an agent node run by the engine against a
loopback Messages API that reports prompt-cache use writes them into `output.usage`,
and the aggregates (and so the API) count them."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.analytics.aggregate import compute
from backend.config import Settings
from backend.kit.http_guard import guarded_client
from backend.models import Workspace
from tests.support.engine import Enqueued, loopback_settings, start, state
from tests.support.fake_anthropic import _stream
from tests.support.procs import free_port
from workers.engine.runner import Runner

USAGE = {
    "input_tokens": 12,
    "output_tokens": 5,
    "cache_read_input_tokens": 300,
    "cache_creation_input_tokens": 40,
}


@contextmanager
def caching_model() -> Iterator[str]:
    """A Messages API whose every answer reports prompt-cache reads and writes."""
    app = FastAPI()

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        body = await request.json()
        message = {
            "id": f"msg_{uuid.uuid4().hex[:12]}", "type": "message", "role": "assistant",
            "model": body["model"], "content": [{"type": "text", "text": "cached"}],
            "stop_reason": "end_turn", "stop_sequence": None, "usage": USAGE,
        }  # fmt: skip
        if body.get("stream"):
            return StreamingResponse(_stream(message), media_type="text/event-stream")
        return JSONResponse(message)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


async def test_an_agent_nodes_cache_tokens_reach_the_aggregates(
    settings: Settings, maker: async_sessionmaker[AsyncSession], workspace: Workspace
) -> None:
    with caching_model() as url:
        anthropic = settings.anthropic.model_copy(
            update={"api_key": SecretStr("k"), "base_url": url, "max_retries": 0}
        )
        run_settings = loopback_settings(settings).model_copy(update={"anthropic": anthropic})
        async with guarded_client(["127.0.0.1/32"]) as http:
            runner = Runner(run_settings, maker, http, f"cache-{uuid.uuid4().hex[:6]}", Enqueued())
            definition = {
                "nodes": [
                    {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
                    {"id": "think", "type": "agent",
                     "config": {"model": "claude-sonnet-5-5", "prompt": "hi"}},
                ],
                "connections": [{"source": "start", "target": "think"}],
            }  # fmt: skip
            execution_id = await start(maker, workspace, definition)
            assert await runner.execute(execution_id) == "completed"
    ex, rows = await state(maker, execution_id)
    usage: dict[str, Any] = rows["think"].output["usage"]
    assert usage == {
        "input_tokens": 12,
        "output_tokens": 5,
        "cache_read_input_tokens": 300,
        "cache_creation_input_tokens": 40,
    }
    now = datetime.now(UTC)
    async with maker() as session:
        computed = await compute(
            session, workspace.id, ex.created_at - timedelta(hours=1), now + timedelta(hours=1)
        )
    whole = [r for (_, kind, _), r in computed.items() if kind == "workspace"]
    assert sum(r.cache_read_tokens for r in whole) == 300
    assert sum(r.cache_write_tokens for r in whole) == 40
    model = [r for (_, kind, key), r in computed.items() if kind == "model"]
    assert [r.cache_read_tokens for r in model] == [300]
