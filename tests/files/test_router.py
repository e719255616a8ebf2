"""/api/v1/tools/files: multipart upload (type sniffed from the bytes, size capped),
metadata, download with safe headers, list, delete (bytes gone too), workspace scoping."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings, StorageSettings
from tests.support.asgi import client_for
from tests.support.identity import Actor

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


@pytest.fixture
async def api(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    from backend.main import create_app

    local = settings.model_copy(
        update={
            "storage": StorageSettings(local_root=str(tmp_path)),
            "tools": settings.tools.model_copy(update={"max_upload_bytes": 2048}),
        }
    )
    app: FastAPI = create_app(local)
    async for c in client_for(app, sessionmaker):
        yield c


async def test_upload_download_list_delete(
    api: httpx.AsyncClient, editor: Actor, tmp_path: Path
) -> None:
    r = await api.post(
        "/api/v1/tools/files/upload",
        headers=editor.headers,
        files={"file": ("../../etc/picture.txt", PNG, "text/plain")},
    )
    assert r.status_code == 201, r.text
    meta = r.json()
    # Named by its last segment, typed by its bytes (not the declared text/plain).
    assert meta["name"] == "picture.txt" and meta["content_type"] == "image/png"
    assert meta["size"] == len(PNG) and len(meta["sha256"]) == 64
    stored = list(tmp_path.rglob(meta["id"]))  # noqa: ASYNC240 - a test's look at disk
    assert len(stored) == 1 and stored[0].read_bytes() == PNG
    r = await api.get(f"/api/v1/tools/files/{meta['id']}?download=1", headers=editor.headers)
    assert r.status_code == 200 and r.content == PNG
    assert r.headers["content-type"] == "image/png"
    assert r.headers["content-disposition"].startswith("attachment;")
    r = await api.get("/api/v1/tools/files?q=picture", headers=editor.headers)
    assert [f["id"] for f in r.json()["items"]] == [meta["id"]]
    r = await api.delete(f"/api/v1/tools/files/{meta['id']}", headers=editor.headers)
    assert r.status_code == 204
    assert not stored[0].exists()
    r = await api.get(f"/api/v1/tools/files/{meta['id']}", headers=editor.headers)
    assert r.status_code == 404


async def test_active_content_is_downloaded_as_bytes(api: httpx.AsyncClient, editor: Actor) -> None:
    html = b"<html><script>alert(1)</script></html>"
    r = await api.post(
        "/api/v1/tools/files/upload", headers=editor.headers, files={"file": ("x.html", html)}
    )
    assert r.status_code == 201, r.text
    r = await api.get(f"/api/v1/tools/files/{r.json()['id']}?download=1", headers=editor.headers)
    assert r.headers["content-type"] == "application/octet-stream"


@pytest.mark.parametrize(
    ("files", "status"),
    [({"file": ("big.bin", b"x" * 4096)}, 413), ({"other": ("a.txt", b"hi")}, 422)],
)
async def test_oversized_and_misnamed_uploads_are_refused(
    api: httpx.AsyncClient, editor: Actor, files: dict[str, tuple[str, bytes]], status: int
) -> None:
    r = await api.post("/api/v1/tools/files/upload", headers=editor.headers, files=files)
    assert r.status_code == status, r.text
