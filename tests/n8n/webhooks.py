"""The stand-in with production webhooks, as n8n serves them: `<base>/webhook/<path>`
answers for an active workflow whose Webhook node has that path and method (n8n's 404
otherwise), runs it (an execution appears) and answers what the workflow's last node
would: here, what it received. Calls are kept in `hooks`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tests.n8n.standin import StandIn, build_app


@dataclass
class Hook:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class HookedStandIn(StandIn):
    hooks: list[Hook] = field(default_factory=list)
    # Statuses to answer the next webhook calls with (then normal service).
    hook_faults: list[int] = field(default_factory=list)

    def reset(self) -> None:
        super().reset()
        self.hooks.clear()
        self.hook_faults.clear()

    def webhook_workflow(
        self, name: str, path: str, method: str = "POST", *, active: bool = True
    ) -> dict[str, Any]:
        workflow = self.add_workflow(name, active=active)
        workflow["nodes"][0]["parameters"] = {"path": path, "httpMethod": method}
        workflow["nodes"][0]["webhookId"] = f"hook-{workflow['id']}"
        return workflow


def _serve(s: HookedStandIn) -> Any:
    app = build_app(s)

    @app.api_route("/webhook/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def webhook(path: str, request: Request) -> Response:
        raw = await request.body()
        s.hooks.append(
            Hook(request.method, path, dict(request.query_params), dict(request.headers), raw)
        )
        if s.hook_faults:
            return JSONResponse({"message": "Error in workflow"}, status_code=s.hook_faults.pop(0))
        for wf in s.workflows.values():
            for node in wf["nodes"]:
                params = node.get("parameters") or {}
                if (
                    wf["active"]
                    and node["type"] == "n8n-nodes-base.webhook"
                    and params.get("path") == path
                    and params.get("httpMethod", "GET") == request.method
                ):
                    execution = s.add_execution(wf["id"], "success", mode="webhook")
                    return JSONResponse(
                        {"received": raw.decode() or None, "query": dict(request.query_params),
                         "execution": execution["id"]}
                    )  # fmt: skip
        return JSONResponse(
            {"code": 404, "message": f'The requested webhook "{request.method} {path}" is not '
             "registered.", "hint": "Publish the workflow."},
            status_code=404,
        )  # fmt: skip

    return app


@contextmanager
def running_hooked() -> Iterator[HookedStandIn]:
    s = HookedStandIn()
    server = uvicorn.Server(
        uvicorn.Config(_serve(s), host=s.host, port=s.port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("n8n stand-in did not start")
        time.sleep(0.02)
    try:
        yield s
    finally:
        server.should_exit = True
        thread.join(10)
