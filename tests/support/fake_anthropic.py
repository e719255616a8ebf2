"""A local server that speaks the Anthropic Messages API (POST /v1/messages), for the
real `anthropic` SDK to talk to on 127.0.0.1. Its answers are scripted by the prompt:

- "use <tool>" in the first user turn, with that tool offered: a tool_use turn, then,
  once the tool_result comes back, a text answer quoting it ("use http_request on
  <url>" and "use web_read on <url>" ask for that URL, "use web_search for <query>"
  for that query);
- "loop forever": a tool_use turn every time (to hit the iteration cap);
- "overloaded": HTTP 529, as the real API answers when overloaded;
- "ratelimit-once": HTTP 429 the first time, then an answer;
- "spend": HTTP 429 with the spend-limit message (not worth retrying);
- "long answer": a 3000-character answer (streamed in small deltas when asked to);
- `script(a, b, ...)` placed in the first user turn, with tools offered: the n-th
  assistant turn calls the forced tool (tool_choice, else the first tool) with input
  a, b, ... (the last one repeats), whatever else the turn says;
- "no-strict" with a tool declared `strict`: HTTP 400, as an endpoint without strict
  tool input answers;
- anything else: "echo: <prompt>".
With `"stream": true` the same answers come as the API's server-sent events.
Every request is kept, so tests can check what the SDK actually sent.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests.support.procs import free_port


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(str(b.get("text") or b.get("content") or "") for b in content)


SCRIPT = re.compile(r"SCRIPT:([A-Za-z0-9_=-]+)")


def script(*answers: dict[str, Any]) -> str:
    """A marker for a prompt: the tool inputs the server answers with, turn by turn."""
    return "SCRIPT:" + base64.urlsafe_b64encode(json.dumps(answers).encode()).decode()


def build_app(requests: list[dict[str, Any]]) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        body = await request.json()
        requests.append({"body": body, "headers": dict(request.headers)})
        msgs = body["messages"]
        first = _text_of(msgs[0]["content"])
        last = msgs[-1]["content"]
        usage = {"input_tokens": 10 * len(msgs), "output_tokens": 7}
        tools = {t["name"] for t in body.get("tools", [])}

        def reply(content: list[dict[str, Any]], stop: str) -> Response:
            message = {
                "id": f"msg_{uuid.uuid4().hex[:12]}", "type": "message", "role": "assistant",
                "model": body["model"], "content": content, "stop_reason": stop,
                "stop_sequence": None, "usage": usage,
            }  # fmt: skip
            if body.get("stream"):
                return StreamingResponse(_stream(message), media_type="text/event-stream")
            return JSONResponse(message)

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
        scripted = SCRIPT.search(first)
        if "no-strict" in first and any(t.get("strict") for t in body.get("tools", [])):
            return JSONResponse(
                {
                    "type": "error",
                    "error": {
                        "type": "invalid_request_error",
                        "message": "tools.0.strict: Extra inputs are not permitted",
                    },
                },
                status_code=400,
            )
        if scripted and tools:
            answers = json.loads(base64.urlsafe_b64decode(scripted.group(1)))
            turn = sum(1 for m in msgs if m["role"] == "assistant")
            forced = (body.get("tool_choice") or {}).get("name") or body["tools"][0]["name"]
            call = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:10]}", "name": forced}
            call["input"] = answers[min(turn, len(answers) - 1)]
            return reply([call], "tool_use")
        wanted = next((name for name in tools if f"use {name}" in first), None)
        looping = "loop forever" in first and tools
        answered = isinstance(last, list) and any(b.get("type") == "tool_result" for b in last)
        if (wanted or looping) and (looping or not answered):
            name = wanted or sorted(tools)[0]
            tool_input: dict[str, Any] = (
                {"task": "say hi"} if name.startswith("agent_") else {"timezone": "Europe/Paris"}
            )
            if name in ("http_request", "web_read"):
                # "use http_request on <url>", "use web_read on <url>"
                tool_input = {"url": first.split(" on ", 1)[1].split()[0]}
            elif name == "web_search":
                # "use web_search for <query>"
                tool_input = {"query": first.split(" for ", 1)[1].strip()}
            use: dict[str, Any] = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:10]}"}
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
        if "long answer" in first:
            words = " ".join(f"word{i:04d}" for i in range(400))
            return reply([{"type": "text", "text": words[:3000]}], "end_turn")
        return reply([{"type": "text", "text": f"echo: {first}"}], "end_turn")

    return app


def _sse(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


async def _stream(message: dict[str, Any]) -> AsyncIterator[str]:
    """A message as the Messages API streams it: start, blocks in deltas, delta, stop."""
    start = {**message, "content": [], "stop_reason": None}
    start["usage"] = {**message["usage"], "output_tokens": 1}
    yield _sse("message_start", {"type": "message_start", "message": start})
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            opening: dict[str, Any] = {"type": "text", "text": ""}
            deltas = [
                {"type": "text_delta", "text": block["text"][i : i + 7]}
                for i in range(0, len(block["text"]), 7)
            ]
        else:
            opening = {**block, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": json.dumps(block["input"])}]
        yield _sse(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": opening},
        )
        for delta in deltas:
            yield _sse(
                "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": delta},
            )
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
    yield _sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": message["usage"]["output_tokens"]},
        },
    )
    yield _sse("message_stop", {"type": "message_stop"})


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
