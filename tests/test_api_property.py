"""Property-based test of the whole HTTP API: schemathesis generates requests from our own
OpenAPI document (valid ones, ones aimed at real resources, and invalid ones) and every
answer must be free of 5xx and match the document: declared status, content type,
headers and body schema. Then every path is asked with each method it does not serve,
and must answer 405 with an `Allow` that lists exactly the methods the document has.

Requests go through the in-process app with its lifespan, signed in as a real owner of
a real workspace, inside the test's rolled-back transaction. Hypothesis runs in a
worker thread and hands each request to the event loop the app lives on.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from celery import Celery
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.routing import compile_path

from backend.auth.permissions import Role
from backend.config import Settings
from backend.kit import tasks
from backend.kit.celery_app import create_celery_app
from backend.main import create_app
from backend.models import Trigger
from tests.support.asgi import client_for
from tests.support.factories import make_execution
from tests.support.identity import make_workspace, member
from tests.triggers.conftest import published, with_trigger

# One worker runs it whole (xdist --dist loadgroup): its requests are many, not long.
pytestmark = pytest.mark.xdist_group("api-property")

# Per operation: ~40 s for the 60-odd operations at 15. Raise it to hunt (40 found no more).
EXAMPLES = int(os.environ.get("API_PROPERTY_EXAMPLES", "15"))
CHECKS = [
    schemathesis.checks.not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Streams until the run ends (a live SSE feed): not a request/answer operation.
STREAMING = ("/events",)
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


@pytest.fixture
def memory_broker(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> Celery:
    """Runs the fuzz admits are enqueued on kombu's in-memory transport, so no Celery
    worker sharing this test worker's Redis picks up a run that is rolled back."""
    app = create_celery_app(settings)
    app.conf.broker_url = "memory://"  # type: ignore[misc]
    monkeypatch.setattr(tasks, "celery_app", app)
    return app


@pytest.fixture
def fuzz_app(settings: Settings) -> FastAPI:
    # Budgets that would turn most answers into 429 after a few hundred requests, and a
    # webhook ?wait that would hold a request for seconds, kept out of the way.
    return create_app(
        settings.model_copy(
            update={
                "auth": settings.auth.model_copy(update={"api_rate_limit": "1000000 per hour"}),
                "triggers": settings.triggers.model_copy(
                    update={"webhook_rate_limit": "1000000 per hour", "webhook_max_wait_s": 0.05}
                ),
            }
        )
    )


async def _seed(session: AsyncSession, settings: Settings) -> tuple[dict[str, str], dict[str, str]]:
    """An owner's headers, and the ids of real resources to aim requests at."""
    workspace = await make_workspace(session)
    owner = await member(session, settings, workspace, Role.OWNER)
    workflow = await published(session, workspace, with_trigger({"kind": "webhook"}))
    trigger = await session.scalar(select(Trigger).where(Trigger.workflow_id == workflow.id))
    assert trigger is not None and trigger.token
    execution = await make_execution(session, workspace, status="failed")
    headers = {**owner.headers, "X-Workspace-ID": str(workspace.id)}
    known = {
        "workspace_id": str(workspace.id),
        "workflow_id": str(workflow.id),
        "trigger_id": str(trigger.id),
        "execution_id": str(execution.id),
        "user_id": str(owner.user.id),
        "token": trigger.token,
    }
    return headers, known


def _order(operation: Any) -> tuple[int, str]:
    # Deletes last (they remove what later requests aim at), signing out very last.
    last = operation.path.endswith("/logout")
    return (2 if last else 1 if operation.method.upper() == "DELETE" else 0, operation.label)


def _as_httpx(kwargs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "method": kwargs["method"],
        "url": kwargs["url"],
        "params": kwargs.get("params"),
        # Generated header values may be any text; on the wire they are bytes.
        "headers": [
            (str(k), v.encode() if isinstance(v, str) else v)
            for k, v in dict(kwargs.get("headers") or {}).items()
        ],
    }
    if kwargs.get("cookies"):
        out["cookies"] = kwargs["cookies"]
    if "json" in kwargs:
        out["json"] = kwargs["json"]
    elif isinstance(kwargs.get("data"), bytes | str):
        out["content"] = kwargs["data"]
    elif kwargs.get("data") is not None:
        out["data"] = kwargs["data"]
    return out


def _fuzz(
    client: httpx.AsyncClient,
    loop: asyncio.AbstractEventLoop,
    operations: list[Any],
    headers: dict[str, str],
    known: dict[str, str],
) -> tuple[int, list[str]]:
    """Runs in a worker thread: Hypothesis drives each operation, and every request is
    sent on `loop`, where the app and the test's transaction live."""
    failures: list[str] = []
    sent = 0

    def send(case: Any) -> httpx.Response:
        kwargs = _as_httpx(case.as_transport_kwargs(base_url="http://test", headers=headers))
        try:
            request = client.build_request(**kwargs)
        except (httpx.InvalidURL, ValueError, TypeError, UnicodeError):
            hypothesis.reject()  # not sendable over HTTP at all
        return asyncio.run_coroutine_threadsafe(client.send(request), loop).result(timeout=60)

    for operation in operations:
        fixed = {
            name: value
            for name, value in known.items()
            if "{" + name + "}" in operation.path
            and not (name == "token" and "/hooks/" not in operation.path)
        }
        strategy = st.one_of(
            operation.as_strategy(path_parameters=fixed),
            operation.as_strategy(),
            operation.as_strategy(GenerationMode.NEGATIVE, path_parameters=fixed),
        )

        @hypothesis.settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def check(case: Any) -> None:
            nonlocal sent
            response = send(case)
            sent += 1
            case.validate_response(response, checks=CHECKS)

        try:
            check()
        except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup
            failures.append(f"{operation.label}: {exc}"[:3000])
    return sent, failures


async def test_no_generated_request_gets_a_5xx_or_an_answer_the_document_does_not_declare(
    fuzz_app: FastAPI,
    sessionmaker: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    settings: Settings,
    memory_broker: Celery,
) -> None:
    headers, known = await _seed(session, settings)
    async for client in client_for(fuzz_app, sessionmaker):
        schema = schemathesis.openapi.from_dict(fuzz_app.openapi())
        operations = sorted(
            (
                result.ok()  # type: ignore[union-attr]
                for result in schema.get_all_operations()
                if not result.ok().path.endswith(STREAMING)  # type: ignore[union-attr]
            ),
            key=_order,
        )
        assert len(operations) > 50
        sent, failures = await asyncio.to_thread(
            _fuzz, client, asyncio.get_running_loop(), operations, headers, known
        )
    print(f"{sent} generated requests over {len(operations)} operations")
    assert not failures, "\n\n".join(failures)
    # Most examples must reach the app: a generator that only produced unsendable
    # requests would pass vacuously.
    assert sent >= len(operations) * EXAMPLES // 2


async def test_every_path_answers_405_with_its_real_methods_in_allow(
    fuzz_app: FastAPI,
    sessionmaker: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    settings: Settings,
) -> None:
    headers, known = await _seed(session, settings)
    async for client in client_for(fuzz_app, sessionmaker):
        paths = fuzz_app.openapi()["paths"]
        templates = [(compile_path(p)[0], {m.upper() for m in item}) for p, item in paths.items()]
        for path in paths:
            if path.endswith(STREAMING):
                continue
            url = path
            for name, value in {**known, "number": "1", "agent_id": str(uuid.uuid4())}.items():
                url = url.replace("{" + name + "}", value)
            url = url.replace("{", "").replace("}", "")
            # /workflows/import also matches /workflows/{workflow_id}: both serve it.
            served = {m for regex, ms in templates if regex.match(url) for m in ms}
            for method in sorted(set(METHODS) - served):
                r = await client.request(method, url, headers=headers)
                assert r.status_code == 405, (method, path, r.status_code, r.text)
                assert r.json()["error"] == "method_not_allowed"
                allowed = {m.strip() for m in r.headers["allow"].split(",")}
                assert allowed == served, (method, path, r.headers["allow"])
