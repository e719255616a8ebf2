"""A local server that speaks the Anthropic Messages API (POST /v1/messages), for the
real `anthropic` SDK to talk to on 127.0.0.1. Its answers are scripted by the prompt:

- "use <tool>" in the first user turn, with that tool offered: a tool_use turn, then,
  once the tool_result comes back, a text answer quoting it;
- "loop forever": a tool_use turn every time (to hit the iteration cap);
- "overloaded": HTTP 529, as the real API answers when overloaded;
- "ratelimit-once": HTTP 429 the first time, then an answer;
- "spend": HTTP 429 with the spend-limit message (not worth retrying);
- anything else: "echo: <prompt>".
Every request is kept, so tests can check what the SDK actually sent.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.support.procs import free_port


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(str(b.get("text") or b.get("content") or "") for b in content)


def build_app(requests: list[dict[str, Any]]) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/messages")
    async def messages(request: Request) -> JSONResponse:
        body = await request.json()
        requests.append({"body": body, "headers": dict(request.headers)})
        msgs = body["messages"]
        first = _text_of(msgs[0]["content"])
        last = msgs[-1]["content"]
        usage = {"input_tokens": 10 * len(msgs), "output_tokens": 7}
        tools = {t["name"] for t in body.get("tools", [])}

        def reply(content: list[dict[str, Any]], stop: str) -> JSONResponse:
            return JSONResponse(
                {
                    "id": f"msg_{uuid.uuid4().hex[:12]}", "type": "message", "role": "assistant",
                    "model": body["model"], "content": content, "stop_reason": stop,
                    "stop_sequence": None, "usage": usage,
                }
            )  # fmt: skip

        if "ratelimit-once" in first and not any(
            "ratelimit-once" in str(r["body"]) for r in requests[:-1]
        ):
            return JSONResponse(
                {"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limited"}},
                status_code=429,
                headers={"retry-after": "0"},
            )
        if "spend" in first:
            return JSONResponse(
                {
                    "type": "error",
                    "error": {
                        "type": "rate_limit_error",
                        "message": "Your credit balance is too low",
                    },
                },
                status_code=429,
            )
        if "overloaded" in first:
            return JSONResponse(
                {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
                status_code=529,
            )
        wanted = next((name for name in tools if f"use {name}" in first), None)
        looping = "loop forever" in first and tools
        answered = isinstance(last, list) and any(b.get("type") == "tool_result" for b in last)
        if (wanted or looping) and (looping or not answered):
            name = wanted or sorted(tools)[0]
            tool_input = (
                {"task": "say hi"} if name.startswith("agent_") else {"timezone": "Europe/Paris"}
            )
            use = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:10]}"}
            use |= {"name": name, "input": tool_input}
            return reply([{"type": "text", "text": "Let me check."}, use], "tool_use")
        if answered:
            result = next(b for b in last if b.get("type") == "tool_result")
            content = result.get("content")
            return reply(
                [
                    {
                        "type": "text",
                        "text": "The tool said: "
                        + (content if isinstance(content, str) else json.dumps(content)),
                    }
                ],
                "end_turn",
            )
        return reply([{"type": "text", "text": f"echo: {first}"}], "end_turn")

    return app


@contextmanager
def fake_anthropic() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    requests: list[dict[str, Any]] = []
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(build_app(requests), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("fake Anthropic server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", requests
    finally:
        server.should_exit = True
        thread.join(10)
