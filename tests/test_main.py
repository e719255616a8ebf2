"""The error contract and request context: every error body is {"error", "detail"},
validation errors name the field, nothing leaks a trace, every request has an id."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.kit import errors
from backend.kit.db import UnitOfWorkDep
from backend.main import create_app
from backend.models import Workspace
from tests.support.asgi import client_for


class Item(BaseModel):
    name: str = Field(min_length=1)
    count: int


def build_app(settings: Settings) -> FastAPI:
    app = create_app(settings)

    @app.get("/t/not-found")
    async def not_found() -> None:
        raise errors.NotFound("workflow not found", field="workflow_id")

    @app.get("/t/rate-limited")
    async def rate_limited() -> None:
        raise errors.RateLimited("slow down", retry_after_s=7)

    @app.get("/t/transition")
    async def transition() -> None:
        raise errors.InvalidTransition("completed -> running is not allowed")

    @app.post("/t/items")
    async def items(item: Item) -> Item:
        return item

    @app.get("/t/boom")
    async def boom() -> None:
        raise RuntimeError("internal detail: password=hunter2")

    @app.post("/t/workspaces/{slug}")
    async def create(slug: str, uow: UnitOfWorkDep, fail: bool = False) -> dict[str, str]:
        uow.session.add(Workspace(name=slug, slug=slug))
        await uow.session.flush()
        if fail:
            raise errors.Conflict("refused after the write")
        return {"slug": slug}

    return app


@pytest.fixture
async def tclient(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]
) -> AsyncIterator[httpx.AsyncClient]:
    async for c in client_for(build_app(settings), sessionmaker):
        yield c


async def test_domain_errors_map_to_status_and_code(tclient: httpx.AsyncClient) -> None:
    r = await tclient.get("/t/not-found")
    assert r.status_code == 404
    body = r.json()
    assert body["error"] == "not_found"
    assert body["detail"] == "workflow not found"
    assert body["field"] == "workflow_id"
    assert body["request_id"] == r.headers["x-request-id"]

    r = await tclient.get("/t/transition")
    assert (r.status_code, r.json()["error"]) == (409, "invalid_transition")

    r = await tclient.get("/t/rate-limited")
    assert (r.status_code, r.json()["error"], r.headers["retry-after"]) == (
        429,
        "rate_limited",
        "7",
    )


async def test_validation_errors_name_each_field(tclient: httpx.AsyncClient) -> None:
    r = await tclient.post("/t/items", json={"name": "", "count": "many"})
    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "validation_error"
    fields = {f["field"]: f for f in body["fields"]}
    assert set(fields) == {"name", "count"}
    assert fields["count"]["in"] == "body"
    assert body["detail"].startswith(("name:", "count:"))


async def test_malformed_json_is_a_validation_error_not_a_crash(tclient: httpx.AsyncClient) -> None:
    r = await tclient.post(
        "/t/items", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    assert r.json()["error"] == "validation_error"


async def test_framework_errors_use_the_same_body(tclient: httpx.AsyncClient) -> None:
    r = await tclient.get("/no/such/route")
    assert r.status_code == 404
    assert r.json()["error"] == "not_found"
    r = await tclient.delete("/health")
    assert r.status_code == 405
    assert r.json()["error"] == "method_not_allowed"


async def test_unhandled_errors_answer_500_without_leaking(
    tclient: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        r = await tclient.get("/t/boom", headers={"X-Request-ID": "trace-me-1"})
    assert r.status_code == 500
    assert r.json() == {
        "error": "internal_error",
        "detail": "internal server error",
        "request_id": "trace-me-1",
    }
    assert "hunter2" not in r.text
    assert r.headers["x-request-id"] == "trace-me-1"
    # The trace is in the log, with the request id to find it.
    logged = [
        rec
        for rec in caplog.records
        if isinstance(rec.msg, dict) and rec.msg.get("event") == "unhandled_error"
    ]
    assert logged
    assert logged[0].msg["request_id"] == "trace-me-1"


async def test_request_id_is_echoed_or_generated(
    tclient: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        r = await tclient.get("/t/not-found", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    access = [
        rec.msg
        for rec in caplog.records
        if isinstance(rec.msg, dict) and rec.msg.get("event") == "request"
    ]
    assert access
    assert access[-1]["request_id"] == "abc-123"
    assert access[-1]["status"] == 404

    generated = (await tclient.get("/health")).headers["x-request-id"]
    assert len(generated) == 32
    # An id that could forge log lines is replaced, not echoed.
    r = await tclient.get("/health", headers={"X-Request-ID": "bad id\twith spaces"})
    assert r.headers["x-request-id"] != "bad id\twith spaces"


async def test_unit_of_work_commits_on_success_and_rolls_back_on_error(
    tclient: httpx.AsyncClient, session: AsyncSession
) -> None:
    async def stored(slug: str) -> int:
        return int(await session.scalar(select(func.count()).where(Workspace.slug == slug)) or 0)

    assert (await tclient.post("/t/workspaces/kept")).status_code == 200
    assert await stored("kept") == 1
    assert (await tclient.post("/t/workspaces/dropped", params={"fail": True})).status_code == 409
    assert await stored("dropped") == 0


async def test_openapi_and_docs_are_served(tclient: httpx.AsyncClient) -> None:
    assert (await tclient.get("/openapi.json")).json()["info"]["title"] == "Orchestration Studio"
    assert (await tclient.get("/docs")).status_code == 200
