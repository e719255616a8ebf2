"""One local HTTP server on 127.0.0.1 playing every outside party the tools API talks to:
web pages (an article, plain text, Latin-1, a PDF, a 404, a page too big, one that
drips), a redirect, three search providers (SearXNG, Brave, Jina answer shapes) and an
OpenAI-compatible image endpoint. Every request is kept, so tests can check what our
side actually sent (keys, queries)."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

from tests.support.procs import free_port

BRAVE_KEY = "brave-test-key"
JINA_KEY = "jina-test-key"
IMAGE_KEY = "image-test-key"
# A real 1x1 PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)

ARTICLE = """<!doctype html>
<html><head><title>  The Article
 Title </title><meta name="description" content="A page for the tests"></head>
<body>
<nav><a href="/">Home</a> <a href="/about#team">About</a> <a href="javascript:alert(1)">x</a>
<a href="mailto:someone@example.com">mail</a></nav>
<article>
<h1>Orchestration notes</h1>
<p>Workflows are graphs of nodes. Each node runs when its inputs are ready, and every
step is recorded so that a run can be followed live and resumed after a crash.</p>
<p>Agents call tools in a loop; see <a href="https://docs.example.com/agents">the agent
guide</a> and <a href="/about">about us</a> for more on how the loop is bounded.</p>
<ul><li>first point</li><li>second point</li></ul>
</article>
<script>var secret = "script text is not content";</script>
<footer>Copyright 2026</footer>
</body></html>"""


@dataclass
class Sites:
    base: str
    requests: list[dict[str, Any]] = field(default_factory=list)

    def seen(self, path_prefix: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"].startswith(path_prefix)]


def build_app(sites: Sites) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def keep(request: Request, call_next: Any) -> Any:
        sites.requests.append(
            {
                "method": request.method,
                "path": request.url.path,
                "raw_path": request.scope.get("raw_path", b"").decode(),
                "query": dict(request.query_params),
                "headers": dict(request.headers),
                "body": (await request.body()).decode(errors="replace"),
            }
        )
        return await call_next(request)

    @app.get("/article")
    async def article() -> Response:
        return Response(ARTICLE, media_type="text/html; charset=utf-8")

    @app.get("/plain")
    async def plain() -> Response:
        return Response("just text\n  with its spacing kept\n", media_type="text/plain")

    @app.get("/latin1")
    async def latin1() -> Response:
        page = "<html><head><title>Caf\xe9</title></head><body><p>" + "Un caf\xe9 cr\xe8me. " * 30
        return Response(
            (page + "</p></body></html>").encode("latin-1"),
            media_type="text/html; charset=iso-8859-1",
        )

    @app.get("/pdf")
    async def pdf() -> Response:
        return Response(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", media_type="application/pdf")

    @app.get("/missing")
    async def missing() -> Response:
        return Response("<h1>Not here</h1>", status_code=404, media_type="text/html")

    @app.get("/big")
    async def big() -> Response:
        return Response("<p>" + "x" * 300_000 + "</p>", media_type="text/html")

    @app.get("/drip")
    async def drip() -> StreamingResponse:
        # A byte at a time, slower than any sane page: each read is quick, the whole
        # never ends. Only a total bound stops it.
        async def body() -> AsyncIterator[bytes]:
            yield b"<html><body>"
            for _ in range(600):
                await asyncio.sleep(0.1)
                yield b"."

        return StreamingResponse(body(), media_type="text/html")

    @app.get("/redirect")
    async def redirect(to: str) -> Response:
        return RedirectResponse(to, status_code=302)

    # Search providers -----------------------------------------------------------------

    @app.get("/searx/search")
    async def searx(q: str, format: str = "html") -> Response:
        if format != "json":
            return Response("<html>searx</html>", media_type="text/html")
        results = [
            {"url": f"https://r{i}.example/{q.replace(' ', '-')}", "title": f"Result {i} for {q}",
             "content": f"snippet {i} &amp; more"}
            for i in range(30)
        ]  # fmt: skip
        results.insert(1, {"url": "javascript:alert(1)", "title": "bad", "content": ""})
        return JSONResponse({"query": q, "results": results})

    @app.get("/brave/search")
    async def brave(request: Request, q: str, count: int = 10) -> Response:
        if request.headers.get("x-subscription-token") != BRAVE_KEY:
            return JSONResponse({"error": "bad token"}, status_code=401)
        results = [
            {"url": f"https://b{i}.example/", "title": f"<strong>{q}</strong> {i}",
             "description": f"about <strong>{q}</strong>"}
            for i in range(count)
        ]  # fmt: skip
        return JSONResponse({"type": "search", "web": {"results": results}})

    @app.get("/jina/{query:path}")
    async def jina(request: Request, query: str) -> Response:
        if request.headers.get("authorization") != f"Bearer {JINA_KEY}":
            return JSONResponse({"code": 401}, status_code=401)
        data = [{"title": f"J {query}", "url": "https://j.example/1", "content": "jina text"}]
        return JSONResponse({"code": 200, "data": data})

    @app.get("/busy/search")
    async def busy() -> Response:
        return JSONResponse({"error": "slow down"}, status_code=429, headers={"Retry-After": "7"})

    @app.get("/broken/search")
    async def broken() -> Response:
        return Response("<html>oops</html>", media_type="text/html")

    # Images ---------------------------------------------------------------------------

    @app.post("/v1/images/generations")
    async def images(request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {IMAGE_KEY}":
            return JSONResponse({"error": {"message": "invalid key"}}, status_code=401)
        body = await request.json()
        if "refuse" in body["prompt"]:
            return JSONResponse(
                {"error": {"message": "the prompt was refused by the safety system"}},
                status_code=400,
            )
        if "overloaded" in body["prompt"]:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        item = {"b64_json": base64.b64encode(PNG).decode(), "revised_prompt": body["prompt"] + "!"}
        return JSONResponse(
            {
                "created": int(time.time()),
                "data": [item] * body["n"],
                "usage": {"input_tokens": 12, "output_tokens": 345, "total_tokens": 357},
            }
        )

    return app


@contextmanager
def local_sites() -> Iterator[Sites]:
    port = free_port()
    sites = Sites(base=f"http://127.0.0.1:{port}")
    server = uvicorn.Server(
        uvicorn.Config(build_app(sites), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the local sites did not start")
        time.sleep(0.02)
    try:
        yield sites
    finally:
        server.should_exit = True
        thread.join(10)
