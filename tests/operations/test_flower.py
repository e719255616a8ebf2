"""Flower, started the way the Procfile starts it, against the test broker: behind basic
auth, it lists the worker, shows a `workflow.execute` task whose args carry the
execution id after a run, and serves Prometheus metrics."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, delete
from sqlalchemy.orm import Session

from backend.kit.celery_app import celery_app
from backend.models import Workflow, WorkflowExecution, WorkflowVersion, Workspace
from tests.support.factories import MINIMAL
from tests.support.procs import PYTHON, free_port, python_env, running, wait_for

pytestmark = [pytest.mark.xdist_group("crossprocess-b")]
AUTH = ("operator", "flower-test-password")


@pytest.fixture
def pending_run(database: str) -> Iterator[str]:
    """A committed pending execution of a committed workflow; removed afterwards."""
    engine = create_engine(database)
    with Session(engine) as session:
        workspace = Workspace(name="Ops", slug=f"ops-{uuid.uuid4().hex[:10]}")
        session.add(workspace)
        session.flush()
        workflow = Workflow(workspace_id=workspace.id, name="ops", current_version=1)
        session.add(workflow)
        session.flush()
        session.add(WorkflowVersion(workflow_id=workflow.id, number=1, definition=MINIMAL))
        execution = WorkflowExecution(
            workspace_id=workspace.id, workflow_id=workflow.id, version=1,
            trigger_type="manual", status="pending",
        )  # fmt: skip
        session.add(execution)
        session.commit()
        execution_id, workspace_id = str(execution.id), workspace.id
    yield execution_id
    with Session(engine) as session:
        session.execute(delete(Workspace).where(Workspace.id == workspace_id))
        session.commit()
    engine.dispose()


def test_flower_shows_the_worker_and_a_workflow_execute_task_with_its_execution_id(
    worker_name: str, crossprocess_logs: Path, pending_run: str
) -> None:
    port = free_port()
    log = crossprocess_logs / "flower-ops.log"
    env = python_env(FLOWER__PORT=str(port), FLOWER__USER=AUTH[0], FLOWER__PASSWORD=AUTH[1])
    with running([PYTHON, "-m", "workers.flower"], env=env, log=log) as proc:
        base = f"http://127.0.0.1:{port}"

        def get(path: str, **params: Any) -> httpx.Response:
            return httpx.get(f"{base}{path}", params=params, auth=AUTH, timeout=10)

        # Includes Flower's own start, which has taken over a minute on a loaded machine
        # (as in tests/workers/test_crossprocess.py).
        wait_for(
            lambda: get("/api/workers", refresh="1").json().get(worker_name) is not None,
            timeout_s=150, what="worker listed in flower", proc=proc, log=log,
        )  # fmt: skip
        assert httpx.get(f"{base}/api/tasks", timeout=5).status_code == 401

        celery_app.send_task("workflow.execute", args=[pending_run])

        found: dict[str, Any] = {}

        def task_listed() -> bool:
            tasks = get("/api/tasks", taskname="workflow.execute").json()
            for task_id, task in tasks.items():
                if pending_run in str(task.get("args")) and task.get("state") == "SUCCESS":
                    found.update(task, id=task_id)
                    return True
            return False

        wait_for(task_listed, timeout_s=60, what="workflow.execute in flower", proc=proc, log=log)
        assert found["name"] == "workflow.execute"
        assert found["worker"] == worker_name
        # The task's own page, as an operator opens it to revoke it.
        assert get(f"/api/task/info/{found['id']}").json()["args"] == found["args"]

        # Prometheus metrics for scraping (task counts per name and state).
        deadline = time.monotonic() + 30
        while True:
            metrics = httpx.get(f"{base}/metrics", timeout=10).text
            if 'task="workflow.execute"' in metrics:
                break
            assert time.monotonic() < deadline, metrics[-2000:]
            time.sleep(0.5)
        assert "flower_events_total" in metrics and "flower_worker_online" in metrics
