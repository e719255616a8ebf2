"""Parked runs survive the machine dying (issue 16): two runs park, one on a wait step
with a resume URL and one on an approval; the worker is SIGKILLed; the wait is resumed
while no worker is up, the worker starts again, and the approval is decided after the
restart. Both runs complete on their branch, and the step after each parked one runs
exactly once (the target sees each (run, node) once). A second use of the resume URL is
refused. On the fault suite's own PostgreSQL and Valkey, with a real uvicorn; `make
faults`."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from backend.config import Settings
from backend.kit.celery_app import create_celery_app
from backend.models import NodeExecution, Task, Workflow, WorkflowExecution, WorkflowVersion
from tests.faults.stack import Postgres, Target, Valkey, worker
from tests.faults.test_faults import ENGINE, http_node, logs, servers, sync_url, target  # noqa: F401
from tests.support.crossprocess import signed_in_owner
from tests.support.procs import PYTHON, STARTUP_S, free_port, http_ok, python_env, running, wait_for

pytestmark = pytest.mark.xdist_group("faults")

BOUND_S = 60.0  # from the kill to both runs completed


def wait_definition(hits: Target) -> dict[str, Any]:
    return {
        "nodes": [
            {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
            {"id": "hold", "type": "logic",
             "config": {"kind": "wait", "resume_url": True, "timeout_s": 3600}},
            http_node("after_wait", hits),
        ],
        "connections": [
            {"source": "start", "target": "hold"},
            {"source": "hold", "target": "after_wait", "branch": "resumed"},
        ],
    }  # fmt: skip


def approval_definition(hits: Target) -> dict[str, Any]:
    return {
        "nodes": [
            {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
            {"id": "ship", "type": "logic",
             "config": {"kind": "approval", "title": "Ship it?", "notify": False}},
            http_node("after_approval", hits),
        ],
        "connections": [
            {"source": "start", "target": "ship"},
            {"source": "ship", "target": "after_approval", "branch": "approved"},
        ],
    }  # fmt: skip


def test_parked_runs_survive_a_worker_sigkill_and_complete_once_after_decisions(
    servers: tuple[Postgres, Valkey],  # noqa: F811
    target: Target,  # noqa: F811
    logs: Path,  # noqa: F811
) -> None:
    pg, vk = servers
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = python_env(
        DATABASE_URL=pg.url,
        REDIS_URL=vk.url,
        HTTP__ALLOW_PRIVATE_NETWORKS='["127.0.0.1/32"]',
        TASKS__PUBLIC_URL=base,
        **ENGINE,
    )
    db = create_engine(sync_url(pg.url), pool_pre_ping=True)
    app = create_celery_app(Settings(redis_url=vk.url, database_url=pg.url))
    owner = signed_in_owner(pg.url, Settings(database_url=pg.url, redis_url=vk.url))
    ws_id = uuid.UUID(owner["X-Workspace-ID"])

    def query(fn: Callable[[Session], Any]) -> Any:
        with Session(db) as s:
            return fn(s)

    def start(definition: dict[str, Any]) -> uuid.UUID:
        with Session(db) as s:
            wf = Workflow(workspace_id=ws_id, name=f"parked {uuid.uuid4().hex[:6]}",
                          current_version=1, status="published")  # fmt: skip
            s.add(wf)
            s.flush()
            s.add(WorkflowVersion(workflow_id=wf.id, number=1, definition=definition))
            ex = WorkflowExecution(
                workspace_id=ws_id, workflow_id=wf.id, version=1, trigger_type="manual"
            )
            s.add(ex)
            s.commit()
            eid = ex.id
        app.send_task("workflow.execute", args=[str(eid)])
        return eid

    def node(eid: uuid.UUID, node_id: str) -> NodeExecution | None:
        row: NodeExecution | None = query(
            lambda s: s.scalar(
                select(NodeExecution).where(
                    NodeExecution.execution_id == eid, NodeExecution.node_id == node_id
                )
            )
        )
        return row

    def until(what: str, check: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            assert time.monotonic() < deadline, f"not within {timeout_s:g} s: {what}"
            time.sleep(0.2)

    def ready(w: Any) -> None:
        def pong() -> bool:
            assert w.alive(), w.log.read_text()[-4000:]
            return bool(app.control.ping(destination=[f"{w.name}@127.0.0.1"], timeout=0.5))

        until("the worker answers", pong, STARTUP_S)

    w1 = worker("w1", env, logs, concurrency=1)
    uvicorn = [PYTHON, "-m", "uvicorn", "backend.main:app", "--host", "127.0.0.1",
               "--port", str(port)]  # fmt: skip
    with running(uvicorn, env=env, log=logs / "uvicorn.log") as api_proc:
        try:
            w1.start()
            wait_for(http_ok(f"{base}/health"), timeout_s=STARTUP_S, what="uvicorn",
                     proc=api_proc, log=logs / "uvicorn.log")  # fmt: skip
            ready(w1)
            waiting = start(wait_definition(target))
            approving = start(approval_definition(target))

            def parked() -> bool:
                hold, ship = node(waiting, "hold"), node(approving, "ship")
                return bool(hold and hold.status == "waiting" and ship and ship.status == "waiting")

            until("both runs park", parked, 60)
            hold = node(waiting, "hold")
            assert hold is not None and isinstance(hold.output, dict)
            resume_url = str(hold.output["resume_url"])
            assert resume_url.startswith(f"{base}/api/v1/resume/")
            task_id = query(
                lambda s: s.scalar(select(Task.id).where(Task.execution_id == approving))
            )
            assert task_id is not None

            # The machine dies with both runs parked.
            w1.sigkill()
            killed_at = time.monotonic()
            # The wait is resumed while no worker is up: the wake waits in the broker.
            r = httpx.post(resume_url, json={"ok": 1}, timeout=10)
            assert r.status_code == 202, r.text
            again = httpx.post(resume_url, json={"ok": 2}, timeout=10)
            assert again.status_code in (404, 409, 410), again.text
            w1.start()
            ready(w1)
            # The approval is decided after the restart.
            r = httpx.post(f"{base}/api/v1/tasks/{task_id}/approve", headers=owner,
                           json={"comment": "after the crash"}, timeout=10)  # fmt: skip
            assert r.status_code == 200, r.text

            def done() -> bool:
                rows = query(
                    lambda s: s.scalars(
                        select(WorkflowExecution.status).where(
                            WorkflowExecution.id.in_([waiting, approving])
                        )
                    ).all()
                )
                assert "failed" not in rows and "cancelled" not in rows, rows
                return list(rows) == ["completed", "completed"]

            until("both runs complete after the decisions", done, BOUND_S)
            print(f"\n[faults] parked runs completed {time.monotonic() - killed_at:.1f} s "
                  "after the kill")  # fmt: skip
        finally:
            w1.stop()
    db_hold, db_ship = node(waiting, "hold"), node(approving, "ship")
    assert db_hold is not None and db_hold.status == "completed"
    assert isinstance(db_hold.output, dict) and db_hold.output["body"] == {"ok": 1}
    assert db_ship is not None and db_ship.status == "completed"
    assert "approved" in str(db_ship.output)
    # Exactly once: each step after a parked one reached the target once.
    seen = Counter((h.execution, h.node) for h in target.hits)
    assert seen == {(str(waiting), "after_wait"): 1, (str(approving), "after_approval"): 1}
    db.dispose()
