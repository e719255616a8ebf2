"""Cross-process helpers: a real uvicorn serving the API (next to the session's real
Celery worker, see tests/conftest.py), a committed owner signed in to it, and a client's
view of a run (create a workflow over HTTP, wait for the run to end).

`api` (`uvicorn_api`) and `owner` are fixtures of every test (tests/conftest.py imports
them); a test module must not import them itself (that would make a fixture of its own: one more
uvicorn, alive until the session ends)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from backend.auth import tokens
from backend.auth.permissions import Role
from backend.config import Settings
from backend.kit.crypto import hash_token
from backend.models import AuthSession
from tests.support.factories import UserFactory, WorkspaceFactory, WorkspaceMemberFactory
from tests.support.procs import PYTHON, STARTUP_S, free_port, http_ok, python_env, running, wait_for

FINISHED = ("completed", "failed", "cancelled")


@pytest.fixture(scope="session")
def uvicorn_api(database: str, crossprocess_logs: Path) -> Iterator[str]:
    """Base URL of a real uvicorn on this test worker's database and Redis, one per
    xdist worker: it was one per module, ~25 start-ups of the app (5-6 s of CPU each)."""
    port = free_port()
    log = crossprocess_logs / "uvicorn-e2e.log"
    argv = [PYTHON, "-m", "uvicorn", "backend.main:app", "--host", "127.0.0.1", "--port", str(port)]
    with running(argv, env=python_env(), log=log) as proc:
        base = f"http://127.0.0.1:{port}"
        wait_for(http_ok(f"{base}/health"), timeout_s=STARTUP_S, what="uvicorn", proc=proc, log=log)
        yield base


@pytest.fixture(scope="session")
def api(uvicorn_api: str) -> str:
    """The real uvicorn's base URL. A package whose conftest gives `api` another meaning
    (tests/n8n: an in-process client) asks for `uvicorn_api` where it wants this one."""
    return uvicorn_api


@pytest.fixture(scope="module")
def owner(database: str, settings: Settings) -> dict[str, str]:
    return signed_in_owner(database, settings)


def signed_in_owner(database: str, settings: Settings) -> dict[str, str]:
    """Headers of a committed owner of a committed workspace, signed in: the uvicorn
    and the worker are other processes, so the rows must be committed to be seen."""
    engine = create_engine(
        database.replace("postgresql://", "postgresql+psycopg://", 1)
        if database.startswith("postgresql://")
        else database
    )
    with Session(engine) as session:
        user = UserFactory.build(email=f"e2e-{uuid.uuid4().hex[:8]}@example.com", name=None)
        workspace = WorkspaceFactory.build(name="E2E", slug=f"e2e-{uuid.uuid4().hex[:8]}")
        session.add_all([user, workspace])
        session.flush()
        session.add(
            WorkspaceMemberFactory.build(
                workspace_id=workspace.id, user_id=user.id, role=Role.OWNER.value
            )
        )
        sid = uuid.uuid4()
        refresh = tokens.issue(settings, user_id=user.id, session_id=sid, type_="refresh")
        session.add(
            AuthSession(
                id=sid,
                user_id=user.id,
                refresh_token_hash=hash_token(refresh),
                expires_at=datetime.now(UTC) + timedelta(hours=1),
            )
        )
        session.commit()
        access = tokens.issue(settings, user_id=user.id, session_id=sid, type_="access")
        headers = {"Authorization": f"Bearer {access}", "X-Workspace-ID": str(workspace.id)}
    engine.dispose()
    return headers


def wait_until_done(
    api: str, headers: dict[str, str], execution_id: str, timeout_s: float = 30
) -> dict[str, Any]:
    """Poll the run over HTTP until it has finished; its body then."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = httpx.get(
            f"{api}/api/v1/executions/{execution_id}", headers=headers, timeout=10
        ).json()
        if body["status"] in FINISHED:
            return dict(body)
        time.sleep(0.05)  # poll interval
    raise AssertionError(f"execution {execution_id} not finished in {timeout_s} s")


def workflow(api: str, headers: dict[str, str], definition: dict[str, Any]) -> str:
    """Create a workflow over HTTP; its id."""
    r = httpx.post(
        f"{api}/api/v1/workflows",
        headers=headers,
        json={"name": f"e2e {uuid.uuid4().hex[:6]}", **definition},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])
