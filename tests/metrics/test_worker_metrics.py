"""The worker's one metrics endpoint (the prefork pool's numbers, summed): a real worker
with two pool processes runs real workflows, and the run counters move."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.executions import lifecycle
from backend.kit.celery_app import create_celery_app
from backend.kit.db import UnitOfWork
from backend.models import Workspace
from tests.metrics.test_api_metrics import value
from tests.support.factories import create_workflow
from tests.support.procs import PYTHON, free_port, python_env, running, wait_for

# A Redis database of its own: no other test worker's Celery worker takes these runs.
REDIS_DB = 10 + int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)


@pytest.fixture(scope="module")
def metrics_worker(
    database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    port = free_port()
    redis_url = os.environ["REDIS_URL"].rsplit("/", 1)[0] + f"/{REDIS_DB}"
    logs = tmp_path_factory.mktemp("metrics-worker")
    name = f"metrics-{uuid.uuid4().hex[:8]}@127.0.0.1"
    argv = [PYTHON, "-m", "celery", "-A", "workers", "worker", "--loglevel=INFO",
            "--queues=high_priority,default,low_priority", "--concurrency=2",
            f"--hostname={name}", "--without-mingle", "--without-gossip"]  # fmt: skip
    env = python_env(REDIS_URL=redis_url, METRICS__WORKER_PORT=str(port))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = logs / "worker.log"
    url = f"http://127.0.0.1:{port}/metrics"

    def serving() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    with running(argv, env=env, log=log) as proc:
        wait_for(serving, timeout_s=60, what="worker metrics", proc=proc, log=log)
        yield url, redis_url


async def test_runs_move_the_worker_counters_summed_over_the_pool(
    metrics_worker: tuple[str, str],
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    settings: Settings,
) -> None:
    url, redis_url = metrics_worker
    scrape = httpx.AsyncClient(timeout=5)
    before = (await scrape.get(url)).text
    async with UnitOfWork(maker) as uow:
        workflow = await create_workflow(uow.session, workspace.id)
        ids = []
        for _ in range(4):
            run = await lifecycle.create_run(
                uow, workspace_id=workspace.id, workflow_id=workflow.id, version=1,
                trigger_type="manual", trigger_data={}, actor="test", enqueue=False,
            )  # fmt: skip
            assert run is not None
            ids.append(str(run.id))
    app = create_celery_app(settings.model_copy(update={"redis_url": redis_url}))
    for run_id in ids:
        app.send_task("workflow.execute", args=[run_id])

    def finished(text: str) -> float:
        return value(text, "orch_runs_finished_total", status="completed") - value(
            before, "orch_runs_finished_total", status="completed"
        )

    text = before
    for _ in range(300):
        text = (await scrape.get(url)).text
        if finished(text) >= 4:
            break
        await asyncio.sleep(0.1)
    await scrape.aclose()
    assert finished(text) == 4
    assert value(text, "orch_runs_started_total") - value(before, "orch_runs_started_total") == 4
    # Node durations by type, from both pool processes' files.
    assert value(text, "orch_node_duration_seconds_count", type="logic") >= 4
    assert value(text, "orch_node_duration_seconds_count", type="trigger") >= 4
    assert 'orch_queue_depth{queue="high_priority"}' in text
