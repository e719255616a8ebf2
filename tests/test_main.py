"""The error contract and request context: every error body is {"error", "detail"},
validation errors name the field, nothing leaks a trace, every request has an id."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.permissions import Role
from backend.config import Settings
from backend.kit import errors, signing, tasks
from backend.kit.celery_app import create_celery_app
from backend.kit.db import UnitOfWorkDep
from backend.main import create_app
from backend.models import Trigger, Workflow, WorkflowExecution, Workspace
from tests.support.asgi import client_for
from tests.support.identity import Actor, make_workspace, member
from tests.support.procs import free_port
from tests.triggers.conftest import published, with_trigger


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

    @app.get("/t/rule")
    async def rule() -> None:
        raise errors.ValidationFailed("the graph has a cycle: a -> b -> a", field="connections")

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


async def test_a_rule_checked_after_parsing_is_listed_in_fields_too(
    tclient: httpx.AsyncClient,
) -> None:
    """Every validation_error has `fields`, also one a service raises after the request
    passed its schema (clients read one list)."""
    r = await tclient.get("/t/rule")
    assert r.status_code == 422
    assert r.json()["field"] == "connections"
    assert r.json()["fields"] == [
        {"field": "connections", "in": None, "message": "the graph has a cycle: a -> b -> a",
         "type": "value_error"},
    ]  # fmt: skip


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
    first: Any = logged[0].msg
    assert first["request_id"] == "trace-me-1"


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


# What the API accepts, decided at the edge (bodies.py + the request middleware): every
# refusal is 422 validation_error naming the field, on typed and raw-body routes alike.


@pytest.fixture
async def edge(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> tuple[Actor, Workflow, str]:
    """An editor, a published workflow, and the token of its unsigned webhook."""
    workspace = await make_workspace(session)
    actor = await member(session, settings, workspace, Role.EDITOR)
    workflow = await published(session, workspace, with_trigger({"kind": "webhook"}))
    trigger = await session.scalar(select(Trigger).where(Trigger.workflow_id == workflow.id))
    assert trigger is not None and trigger.token
    return actor, workflow, trigger.token


def _nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


# (raw JSON for trigger_data / the webhook body, the field named relative to it)
REFUSED_JSON = [
    pytest.param('{"x": NaN}', "x", id="nan"),
    pytest.param('{"x": [1, Infinity]}', "x[1]", id="infinity"),
    pytest.param('{"x": -Infinity}', "x", id="minus-infinity"),
    pytest.param('{"x": 1e999}', "x", id="overflow"),
    pytest.param('{"x": "a\\u0000b"}', "x", id="nul-in-value"),
    pytest.param('{"a\\u0000": 1}', "", id="nul-in-key"),
    pytest.param('{"x": ' + _nested(300) + "}", "x", id="300-deep"),
    pytest.param('{"x": ' + _nested(20_000) + "}", "", id="20000-deep"),
    pytest.param('{"x": ' + "9" * 5000 + "}", "", id="5000-digit-int"),
]


def _refused(r: httpx.Response, field_prefix: str, where: str = "body") -> dict[str, str]:
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "validation_error"
    assert body["request_id"] == r.headers["x-request-id"]
    (field,) = body["fields"]
    assert field["in"] == where
    assert field["field"].startswith(field_prefix), field
    assert body["detail"].startswith(field["field"])
    return dict(field)


@pytest.mark.parametrize(("raw", "field"), REFUSED_JSON)
async def test_a_typed_body_with_values_the_api_never_accepts_is_422(
    client: httpx.AsyncClient, edge: tuple[Actor, Workflow, str], raw: str, field: str
) -> None:
    actor, workflow, _ = edge
    body = f'{{"workflow_id": "{workflow.id}", "trigger_data": {raw}}}'
    r = await client.post(
        "/api/v1/executions",
        content=body.encode(),
        headers={**actor.headers, "content-type": "application/json"},
    )
    _refused(r, f"trigger_data.{field}" if field else "")


@pytest.mark.parametrize(("raw", "field"), REFUSED_JSON)
async def test_the_public_webhook_refuses_the_same_values_with_422(
    client: httpx.AsyncClient, edge: tuple[Actor, Workflow, str], raw: str, field: str
) -> None:
    _, _, token = edge
    for content_type in ("application/json", "application/vnd.acme+json", None):
        headers = {"content-type": content_type} if content_type else {}
        r = await client.post(f"/api/v1/hooks/{token}", content=raw.encode(), headers=headers)
        _refused(r, field)


async def test_nul_in_form_fields_query_strings_headers_and_paths_is_422(
    client: httpx.AsyncClient, session: AsyncSession, edge: tuple[Actor, Workflow, str]
) -> None:
    actor, workflow, token = edge
    r = await client.post(f"/api/v1/hooks/{token}", data={"name": "a\x00b"})
    assert _refused(r, "name")["in"] == "body"
    r = await client.get("/api/v1/workflows?q=a%00b", headers=actor.headers)
    _refused(r, "q", where="query")
    r = await client.post(
        "/api/v1/executions",
        json={"workflow_id": str(workflow.id)},
        headers={**actor.headers, "Idempotency-Key": "key\x00"},
    )
    _refused(r, "idempotency-key", where="header")
    _refused(await client.post("/api/v1/hooks/wh_%00"), "path", where="path")
    # Nothing was started by any of them.
    started = select(func.count()).where(WorkflowExecution.workflow_id == workflow.id)
    assert await session.scalar(started) == 0


async def test_numbers_beyond_what_the_database_holds_are_422(
    client: httpx.AsyncClient, edge: tuple[Actor, Workflow, str]
) -> None:
    actor, workflow, token = edge
    big = str(2**63)
    for url in (
        f"/api/v1/workflows?offset={big}",
        f"/api/v1/executions?offset={big}",
        f"/api/v1/workflows/{workflow.id}/versions?offset={big}",
        f"/api/v1/workflows/{workflow.id}/versions/{big}",
    ):
        r = await client.get(url, headers=actor.headers)
        assert r.status_code == 422, (url, r.text)
        assert r.json()["error"] == "validation_error"
    # Not-a-version If-Match values (a superscript digit passes str.isdigit()).
    for if_match in (b"\xb2", big.encode()):
        r = await client.put(
            f"/api/v1/workflows/{workflow.id}",
            json={"name": "renamed"},
            headers={**actor.headers, "If-Match": if_match},  # type: ignore[arg-type]
        )
        _refused(r, "if-match", where="header")
    for wait in ("inf", "nan", "1e999"):
        r = await client.post(f"/api/v1/hooks/{token}?wait={wait}", json={})
        _refused(r, "wait", where="query")


# Redis down: routes that need it answer 503 dependency_unavailable, capacity rate
# limits fail open, and a run whose row committed is admitted (the reaper enqueues it).


@pytest.fixture
async def redis_down(
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with Redis (cache, rate limits, broker) at an address nothing listens on."""
    dead = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    monkeypatch.setattr(tasks, "celery_app", create_celery_app(dead))
    async for c in client_for(create_app(dead), sessionmaker):
        yield c


async def test_with_redis_down_signed_in_requests_still_answer(
    redis_down: httpx.AsyncClient, edge: tuple[Actor, Workflow, str]
) -> None:
    actor, workflow, _ = edge
    r = await redis_down.get("/api/v1/auth/me", headers=actor.headers)
    assert r.status_code == 200, r.text
    r = await redis_down.get(f"/api/v1/workflows/{workflow.id}", headers=actor.headers)
    assert r.status_code == 200, r.text


async def test_with_redis_down_a_started_run_is_admitted_not_reported_failed(
    redis_down: httpx.AsyncClient, session: AsyncSession, edge: tuple[Actor, Workflow, str]
) -> None:
    actor, workflow, token = edge
    started = time.monotonic()
    r = await redis_down.post(
        "/api/v1/executions", json={"workflow_id": str(workflow.id)}, headers=actor.headers
    )
    assert r.status_code == 202, r.text
    # The failed enqueue gives up quickly (it once waited ~20 s on the result backend).
    assert time.monotonic() - started < 5
    execution = await session.get(WorkflowExecution, uuid.UUID(r.json()["id"]))
    # Committed and pending: the reaper enqueues runs nobody claimed.
    assert execution is not None and execution.status == "pending"
    # The public webhook (unsigned) admits the same way.
    r = await redis_down.post(f"/api/v1/hooks/{token}", json={"order": 1})
    assert r.status_code == 202, r.text


async def test_with_redis_down_a_waiting_start_is_admitted_with_202(
    redis_down: httpx.AsyncClient, edge: tuple[Actor, Workflow, str]
) -> None:
    actor, workflow, _ = edge
    started = time.monotonic()
    r = await redis_down.post(
        "/api/v1/executions?wait=10", json={"workflow_id": str(workflow.id)}, headers=actor.headers
    )
    # Nothing can tell it the run ended: it says so at once instead of failing the request.
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "pending"
    assert time.monotonic() - started < 5


async def test_with_redis_down_what_cannot_be_checked_without_it_is_503(
    redis_down: httpx.AsyncClient,
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
) -> None:
    # Sign-in codes: their abuse guard lives in Redis, so it fails closed.
    r = await redis_down.post("/api/v1/auth/request-otp", json={"email": "a@example.com"})
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["error"] == "dependency_unavailable"
    assert body["request_id"] == r.headers["x-request-id"]
    # A signed webhook: its replay guard lives in Redis, so the sender must retry.
    workspace = await make_workspace(session)
    actor = await member(session, settings, workspace, Role.EDITOR)
    workflow = await published(
        session, workspace, with_trigger({"kind": "webhook", "verify_signature": True})
    )
    trigger = await session.scalar(select(Trigger).where(Trigger.workflow_id == workflow.id))
    assert trigger is not None
    r = await client.post(
        f"/api/v1/workflows/{workflow.id}/triggers/{trigger.id}/secret", headers=actor.headers
    )
    secret = r.json()["secret"]
    payload = b'{"order": 1}'
    headers = {**signing.sign(secret, payload), "content-type": "application/json"}
    r = await redis_down.post(f"/api/v1/hooks/{trigger.token}", content=payload, headers=headers)
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "dependency_unavailable"
    started = select(func.count()).where(WorkflowExecution.workflow_id == workflow.id)
    assert await session.scalar(started) == 0


# The OpenAPI document tells the truth about errors (backend/kit/openapi.py).


async def test_the_openapi_document_declares_the_real_error_body_and_statuses(
    tclient: httpx.AsyncClient,
) -> None:
    doc = (await tclient.get("/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    # FastAPI's own 422 body (`detail` as a list) is nowhere: no answer has it.
    assert "HTTPValidationError" not in schemas
    assert "HTTPValidationError" not in (await tclient.get("/openapi.json")).text
    assert schemas["Error"]["required"] == ["error", "detail", "request_id"]
    error = {"$ref": "#/components/schemas/Error"}
    put = doc["paths"]["/api/v1/workflows/{workflow_id}"]["put"]["responses"]
    for status in ("401", "403", "404", "409", "413", "422", "429", "503"):
        assert put[status]["content"]["application/json"]["schema"] == error, status
    assert "Retry-After" in put["429"]["headers"]
    hook = doc["paths"]["/api/v1/hooks/{token}"]["post"]["responses"]
    assert {"401", "404", "409", "413", "422", "429", "503"} <= set(hook)
    assert "403" not in hook  # public: nobody's permissions are checked
    agent_test = doc["paths"]["/api/v1/agents/{agent_id}/test"]["post"]["responses"]
    assert {"402", "424", "502"} <= set(agent_test)
    # And a real 422 has the declared shape.
    body = (await tclient.post("/t/items", json={})).json()
    assert set(schemas["Error"]["required"]) <= set(body)
    for field in body["fields"]:
        assert set(schemas["FieldError"]["required"]) <= set(field)


async def test_405_names_every_method_the_path_serves_in_allow(
    tclient: httpx.AsyncClient,
) -> None:
    # GET and POST /api/v1/workflows are two routes; Allow named only one, or none.
    r = await tclient.delete("/api/v1/workflows")
    assert r.status_code == 405
    assert r.json()["error"] == "method_not_allowed"
    assert r.headers["allow"] == "GET, POST"
    r = await tclient.post(f"/api/v1/workflows/{uuid.uuid4()}")
    assert r.headers["allow"] == "DELETE, GET, PUT"
