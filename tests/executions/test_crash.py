"""A worker killed mid-run (SIGKILL, the whole process tree) loses nothing: a new
worker finishes the run from its checkpoints, and no checkpointed node runs twice."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from backend.config import Settings
from backend.kit.celery_app import create_celery_app
from backend.models import NodeExecution, WorkflowExecution
from tests.support.factories import (
    WorkflowExecutionFactory,
    WorkflowFactory,
    WorkflowVersionFactory,
    WorkspaceFactory,
)
from tests.support.procs import PYTHON, python_env, running, wait_for
from tests.support.target import Target, http_target

pytestmark = pytest.mark.xdist_group("crash")


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    with http_target() as t:
        yield t


def sync_url(url: str) -> str:
    return (
        url
        if url.startswith("postgresql+psycopg://")
        else url.replace("postgresql://", "postgresql+psycopg://", 1)
    )


def test_sigkill_mid_run_then_a_new_worker_finishes_it(
    database: str, target: Target, tmp_path: Path
) -> None:
    # A Redis database of its own: no other test's worker may take these messages.
    worker_number = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    redis_url = os.environ["REDIS_URL"].rsplit("/", 1)[0] + f"/{20 + worker_number}"
    env = python_env(
        REDIS_URL=redis_url,
        HTTP__ALLOW_PRIVATE_NETWORKS='["127.0.0.1/32"]',
        ENGINE__LEASE_S="5",
        ENGINE__WATCH_INTERVAL_S="0.1",
    )
    key = uuid.uuid4().hex[:8]
    nodes: list[dict[str, Any]] = [{"id": "start", "type": "trigger", "config": {"kind": "manual"}}]
    for i in range(10):
        nodes.append(
            {
                "id": f"s{i}",
                "type": "action",
                "config": {"kind": "http_request", "url": f"{target.base}/slow/0.4?n={key}-{i}"},
            }
        )
    connections = [
        {"source": "start", "target": "s0"},
        *[{"source": f"s{i}", "target": f"s{i + 1}"} for i in range(9)],
    ]
    engine = create_engine(sync_url(database))
    # Committed: the workers are other processes.
    with Session(engine) as session:
        ws = WorkspaceFactory.build(name="crash", slug=f"crash-{key}")
        wf = WorkflowFactory.build(workspace_id=ws.id, name="crash")
        version = WorkflowVersionFactory.build(
            workflow_id=wf.id, definition={"nodes": nodes, "connections": connections}
        )
        ex = WorkflowExecutionFactory.build(workspace_id=ws.id, workflow_id=wf.id)
        for row in (ws, wf, version, ex):
            session.add(row)
            session.flush()
        session.commit()
        execution_id = ex.id

    def completed_nodes() -> list[str]:
        with Session(engine) as session:
            rows = session.scalars(
                select(NodeExecution.node_id).where(
                    NodeExecution.execution_id == execution_id, NodeExecution.status == "completed"
                )
            )
            return list(rows.all())

    def lease_lapsed() -> bool:
        with Session(engine) as session:
            return bool(
                session.scalar(
                    select(WorkflowExecution.lease_expires_at < func.now()).where(
                        WorkflowExecution.id == execution_id
                    )
                )
            )

    def owner() -> str | None:
        with Session(engine) as session:
            return session.scalar(
                select(WorkflowExecution.lease_owner).where(WorkflowExecution.id == execution_id)
            )

    def status() -> str:
        with Session(engine) as session:
            return str(
                session.scalar(
                    select(WorkflowExecution.status).where(WorkflowExecution.id == execution_id)
                )
            )

    app = create_celery_app(Settings(redis_url=redis_url))
    worker = [
        PYTHON,
        "-m",
        "celery",
        "-A",
        "workers",
        "worker",
        "--loglevel=INFO",
        "--concurrency=1",
        "--without-mingle",
        "--without-gossip",
    ]
    try:
        with running(
            [*worker, "--hostname=first@127.0.0.1"],
            env=env,
            log=tmp_path / "first.log",
            stop_signal=signal.SIGKILL,
        ) as first:
            wait_for(
                lambda: bool(app.control.ping(destination=["first@127.0.0.1"], timeout=0.5)),
                timeout_s=60,
                what="first worker",
                proc=first,
                log=tmp_path / "first.log",
            )
            app.send_task("workflow.execute", args=[str(execution_id)])
            wait_for(lambda: len(completed_nodes()) >= 4, timeout_s=30, what="a few checkpoints")
            # The machine dies: every process of the worker, at once, no goodbye.
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
        done_before = set(completed_nodes())
        assert status() == "running"
        dead_owner = owner()
        with running(
            [*worker, "--hostname=second@127.0.0.1"], env=env, log=tmp_path / "second.log"
        ) as second:
            wait_for(
                lambda: bool(app.control.ping(destination=["second@127.0.0.1"], timeout=0.5)),
                timeout_s=60,
                what="second worker",
                proc=second,
                log=tmp_path / "second.log",
            )
            # Once the dead worker's lease lapses, the reaper (beat's, or any worker process
            # that runs workflows on this database) hands the run on.
            wait_for(
                lambda: lease_lapsed() or owner() != dead_owner,
                timeout_s=30,
                what="the dead worker's lease to lapse",
            )
            app.send_task("executions.reap")
            wait_for(
                lambda: status() == "completed",
                timeout_s=60,
                what="the run to finish",
                proc=second,
                log=tmp_path / "second.log",
            )
    finally:
        engine.dispose()
    per_node = {f"s{i}": target.query_hits.get(f"{key}-{i}", 0) for i in range(10)}
    # Checkpointed before the kill: ran exactly once. The one in flight may run again.
    assert all(per_node[n] == 1 for n in done_before if n in per_node), per_node
    assert len(done_before & set(per_node)) >= 3
    assert all(1 <= count <= 2 for count in per_node.values()), per_node
    assert sum(per_node.values()) <= 11
