"""A job streamed as Server-Sent Events: what it emits as it goes, then one `result`
event (its answer) or one `error` event (the API's error body with its status), with a
comment ping while it is quiet; a client that goes away cancels the job. Used by the
routes that answer `stream: true` (workflow generation, the tools API)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from backend.kit.errors import DomainError
from backend.kit.logging import get_logger

log = get_logger(__name__)
HEARTBEAT_S = 15.0
Emit = Callable[[str, dict[str, Any]], Awaitable[None]]


def event(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


def error_body(exc: Exception, failed_event: str) -> dict[str, Any]:
    from backend.main import status_for  # main imports the routers that import this

    if isinstance(exc, DomainError):
        body: dict[str, Any] = {"error": exc.code, "detail": exc.detail, **exc.extra}
        if exc.field:
            body["field"] = exc.field
        return {**body, "status": status_for(exc)}
    log.exception(failed_event, exc_info=exc)
    return {"error": "internal_error", "detail": "internal error", "status": 500}


def stream_job(
    job: Callable[[Emit], Awaitable[BaseModel]], *, failed_event: str
) -> StreamingResponse:
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    async def emit(kind: str, data: dict[str, Any]) -> None:
        await queue.put(event(kind, data))

    async def work() -> None:
        try:
            result = await job(emit)
            await queue.put(event("result", result.model_dump(mode="json")))
        except Exception as exc:
            await queue.put(event("error", error_body(exc, failed_event)))
        finally:
            await queue.put(None)

    async def body() -> AsyncIterator[str]:
        task = asyncio.create_task(work())
        try:
            while True:
                try:
                    async with asyncio.timeout(HEARTBEAT_S):
                        item = await queue.get()
                except TimeoutError:
                    yield ": ping\n\n"
                    continue
                if item is None:
                    break
                yield item
        finally:
            # The client went away: stop paying for work nobody will read (what was
            # used so far is still recorded by the job).
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
