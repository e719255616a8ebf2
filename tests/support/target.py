"""A local HTTP service for nodes to call: counts hits per path, and answers as told
by the path (`/ok`, `/status/503`, `/flaky/<key>/<n>` fails n times then succeeds,
`/slow/<seconds>`, `/redirect?to=<url>`)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse

from tests.support.procs import free_port


class Target:
    def __init__(self, host: str) -> None:
        self.hits: Counter[str] = Counter()
        # Hits by the `n` query parameter, for callers that tag their requests.
        self.query_hits: Counter[str] = Counter()
        self.host = host
        self.port = free_port()
        self.base = f"http://{host}:{self.port}"
        self.app = self._app()

    def _app(self) -> FastAPI:
        app = FastAPI()
        target = self

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
        async def anything(path: str, request: Request) -> Any:
            target.hits[path] += 1
            if "n" in request.query_params:
                target.query_hits[request.query_params["n"]] += 1
            parts = path.split("/")
            body = await request.body()
            echo = {
                "path": path,
                "method": request.method,
                "body": body.decode(),
                "auth": request.headers.get("authorization"),
            }
            if parts[0] == "status":
                return JSONResponse(echo, status_code=int(parts[1]))
            if parts[0] == "flaky" and target.hits[path] <= int(parts[2]):
                return JSONResponse({"error": "try again"}, status_code=503)
            if parts[0] == "slow":
                await asyncio.sleep(float(parts[1]))
            if parts[0] == "redirect":
                return RedirectResponse(request.query_params["to"], status_code=302)
            return JSONResponse(echo)

        return app


@contextmanager
def http_target(host: str = "127.0.0.1") -> Iterator[Target]:
    target = Target(host)
    server = uvicorn.Server(
        uvicorn.Config(target.app, host=host, port=target.port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("target server did not start")
        time.sleep(0.02)
    try:
        yield target
    finally:
        server.should_exit = True
        thread.join(10)
