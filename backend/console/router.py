"""/console: a few static files (no build step, nothing third-party) that sign a person
in, list workflows and runs, and follow a run live over the API's WebSocket.

The pages call the same public API as any client. Their policy is strict: scripts and
styles from this origin only (no inline code, so an injected string can never run),
no frames, no forms posting elsewhere. Tokens stay in the tab (sessionStorage), never
in a URL."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response

from backend.kit.errors import NotFound

STATIC = Path(__file__).parent / "static"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# Read once: a fixed set of files, so no request path ever reaches the file system.
FILES = {
    path.name: (path.read_bytes(), TYPES[path.suffix])
    for path in STATIC.iterdir()
    if path.suffix in TYPES
}
ETAGS = {
    name: '"' + hashlib.sha256(body).hexdigest()[:16] + '"' for name, (body, _) in FILES.items()
}

router = APIRouter(prefix="/console", include_in_schema=False)


def _file(request: Request, name: str) -> Response:
    if name not in FILES:
        raise NotFound("no such console file")
    body, media_type = FILES[name]
    headers = {
        "Content-Security-Policy": CSP,
        # Revalidated every time (cheap: 304), so a new release is seen at once.
        "Cache-Control": "no-cache",
        "ETag": ETAGS[name],
    }
    if request.headers.get("if-none-match") == ETAGS[name]:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=media_type, headers=headers)


@router.get("")
@router.get("/")
async def index(request: Request) -> Response:
    return _file(request, "index.html")


@router.get("/{name}")
async def asset(request: Request, name: str) -> Response:
    return _file(request, name)
