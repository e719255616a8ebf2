"""Executions through the public API of a real uvicorn, run by a real Celery worker."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from backend.auth.permissions import Role
from backend.config import Settings
from backend.models import User, Workspace, WorkspaceMember
from tests.support.procs import PYTHON, free_port, http_ok, python_env, running, wait_for
from tests.support.target import http_target

pytestmark = [pytest.mark.xdist_group("crossprocess"), pytest.mark.usefixtures("worker_name")]


@pytest.fixture(scope="module")
def api(database: str, crossprocess_logs: Path) -> Iterator[str]:
    port = free_port()
    log = crossprocess_logs / "uvicorn-e2e.log"
    argv = [PYTHON, "-m", "uvicorn", "backend.main:app", "--host", "127.0.0.1", "--port", str(port)]
    with running(argv, env=python_env(), log=log) as proc:
        base = f"http://127.0.0.1:{port}"
        wait_for(http_ok(f"{base}/health"), timeout_s=60, what="uvicorn", proc=proc, log=log)
        yield base


@pytest.fixture(scope="module")
def owner(database: str, settings: Settings) -> dict[str, str]:
    return signed_in_owner(database, settings)


def signed_in_owner(database: str, settings: Settings) -> dict[str, str]:
    """A committed owner of a committed workspace, signed in."""
    from backend.auth import tokens
    from backend.kit.crypto import hash_token
    from backend.models import AuthSession

    engine = create_engine(
        database.replace("postgresql://", "postgresql+psycopg://", 1)
        if database.startswith("postgresql://")
        else database
    )
    with Session(engine) as session:
        user = User(email=f"e2e-{uuid.uuid4().hex[:8]}@example.com")
        workspace = Workspace(name="E2E", slug=f"e2e-{uuid.uuid4().hex[:8]}")
        session.add_all([user, workspace])
        session.flush()
        session.add(
            WorkspaceMember(workspace_id=workspace.id, user_id=user.id, role=Role.OWNER.value)
        )
        sid = uuid.uuid4()
        refresh = tokens.issue(settings, user_id=user.id, session_id=sid, type_="refresh")
        from datetime import UTC, datetime, timedelta

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
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = httpx.get(
            f"{api}/api/v1/executions/{execution_id}", headers=headers, timeout=10
        ).json()
        if body["status"] in ("completed", "failed", "cancelled"):
            return dict(body)
        time.sleep(0.05)
    raise AssertionError(f"execution {execution_id} not finished in {timeout_s} s")


def workflow(api: str, headers: dict[str, str], definition: dict[str, Any]) -> str:
    r = httpx.post(
        f"{api}/api/v1/workflows",
        headers=headers,
        json={"name": f"e2e {uuid.uuid4().hex[:6]}", **definition},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def chain(n: int) -> dict[str, Any]:
    nodes: list[dict[str, Any]] = [{"id": "start", "type": "trigger", "config": {"kind": "manual"}}]
    conns = []
    previous, source = "start", "{{ trigger.x }}"
    for i in range(n):
        nodes.append(
            {
                "id": f"n{i}",
                "type": "logic",
                "config": {
                    "kind": "transform",
                    "template": "{{ (" + source.strip("{} ") + ") + 1 }}",
                },
            }
        )
        conns.append({"source": previous, "target": f"n{i}"})
        previous, source = f"n{i}", "{{ nodes.n" + str(i) + ".output }}"
    return {"nodes": nodes, "connections": conns}


def test_a_run_goes_from_post_to_completed_through_the_worker(
    api: str, owner: dict[str, str]
) -> None:
    wf = workflow(api, owner, chain(5))
    r = httpx.post(
        f"{api}/api/v1/executions",
        headers={**owner, "Idempotency-Key": "e2e-1"},
        json={"workflow_id": wf, "trigger_data": {"x": 10}},
        timeout=10,
    )
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["status"] == "pending"
    assert r.headers["location"] == accepted["links"]["self"]
    # The same key gives back the same execution.
    again = httpx.post(
        f"{api}/api/v1/executions",
        headers={**owner, "Idempotency-Key": "e2e-1"},
        json={"workflow_id": wf, "trigger_data": {"x": 10}},
        timeout=10,
    )
    assert (again.status_code, again.json()["id"]) == (200, accepted["id"])
    done = wait_until_done(api, owner, accepted["id"])
    assert done["status"] == "completed", done
    assert done["output"] == {"n4": 15}
    assert [n["status"] for n in done["nodes"]] == ["completed"] * 6
    nodes = httpx.get(
        f"{api}/api/v1/executions/{accepted['id']}/nodes", headers=owner, timeout=10
    ).json()
    assert {n["node_id"]: n["output"] for n in nodes}["n2"] == 13
    logs = httpx.get(
        f"{api}/api/v1/executions/{accepted['id']}/logs", headers=owner, timeout=10
    ).json()
    assert logs[-1]["message"] == "completed"
    listed = httpx.get(
        f"{api}/api/v1/executions", headers=owner, params={"workflow_id": wf}, timeout=10
    ).json()
    assert listed["total"] == 1


def test_cancel_through_the_api_stops_a_running_execution(api: str, owner: dict[str, str]) -> None:
    with http_target() as target:
        slow = {
            "nodes": [
                {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
                {
                    "id": "wait",
                    "type": "action",
                    "config": {"kind": "http_request", "url": f"{target.base}/slow/20"},
                },
            ],
            "connections": [{"source": "start", "target": "wait"}],
        }
        wf = workflow(api, owner, slow)
        started = httpx.post(
            f"{api}/api/v1/executions", headers=owner, json={"workflow_id": wf}, timeout=10
        ).json()
        wait_for(lambda: target.hits["slow/20"] == 1, timeout_s=20, what="the slow call to start")
        asked = time.monotonic()
        r = httpx.post(f"{api}/api/v1/executions/{started['id']}/cancel", headers=owner, timeout=10)
        assert r.status_code == 202
        done = wait_until_done(api, owner, started["id"], timeout_s=10)
        assert done["status"] == "cancelled"
        assert time.monotonic() - asked < 2.0
        # A finished run cannot be cancelled again.
        r = httpx.post(f"{api}/api/v1/executions/{started['id']}/cancel", headers=owner, timeout=10)
        assert (r.status_code, r.json()["error"]) == (409, "invalid_transition")


def test_retry_and_rerun(api: str, owner: dict[str, str]) -> None:
    bad = chain(2)
    bad["nodes"][2]["config"]["template"] = "{{ nodes.n0.output.missing.deeper }}"
    wf = workflow(api, owner, bad)
    first = httpx.post(
        f"{api}/api/v1/executions",
        headers=owner,
        json={"workflow_id": wf, "trigger_data": {"x": 1}},
        timeout=10,
    ).json()
    failed = wait_until_done(api, owner, first["id"])
    assert failed["status"] == "failed"
    assert failed["error"]["node_id"] == "n1"
    retried = httpx.post(f"{api}/api/v1/executions/{first['id']}/retry", headers=owner, timeout=10)
    assert retried.status_code == 202
    again = wait_until_done(api, owner, retried.json()["id"])
    assert again["status"] == "failed"
    assert again["retry_of"] == first["id"]
    rerun = httpx.post(f"{api}/api/v1/executions/{first['id']}/rerun", headers=owner, timeout=10)
    assert rerun.status_code == 202
    assert wait_until_done(api, owner, rerun.json()["id"])["status"] == "failed"
