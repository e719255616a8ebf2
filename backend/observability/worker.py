"""Worker metrics: runs started (Celery's task_prerun for the execute tasks), runs
finished with their node durations, retries, tokens and cost (a lifecycle finished
listener, in the run's own closing transaction), lease losses and reaper actions (their
log events), and queue depth (read from the broker when scraped). The worker's main
process serves them all, summed over the prefork pool, on METRICS__WORKER_PORT."""

from __future__ import annotations

import glob
import os
from typing import Any

from celery import signals
from sqlalchemy import select, text

from backend.analytics.aggregate import node_map
from backend.config import get_settings
from backend.executions import lifecycle
from backend.kit.celery_app import QUEUES
from backend.kit.db import UnitOfWork
from backend.kit.logging import get_logger
from backend.models import WorkflowExecution, WorkflowVersion
from backend.observability import metrics

log = get_logger(__name__)
EXECUTE_TASKS = {"workflow.execute": 1, "workflow.execute_many": None}

_NODES = text(
    """
    SELECT node_id, status, attempt, duration_ms, input_tokens, output_tokens, cost_usd,
           CASE WHEN jsonb_typeof(output) = 'object' THEN output->>'model' END AS model
    FROM node_executions WHERE execution_id = :id
    """
)
_types: dict[tuple[Any, int], dict[str, tuple[str, str | None]]] = {}


@lifecycle.on_finished
async def run_finished(uow: UnitOfWork, execution: WorkflowExecution) -> None:
    """Counted when the run's end commits with it: a rolled-back end counts nothing."""
    status = str(execution.status)
    duration = execution.duration_ms
    rows = (await uow.session.execute(_NODES, {"id": execution.id})).all()
    pinned = (execution.workflow_id, execution.version)
    if pinned not in _types and rows:
        definition = await uow.session.scalar(
            select(WorkflowVersion.definition).where(
                WorkflowVersion.workflow_id == execution.workflow_id,
                WorkflowVersion.number == execution.version,
            )
        )
        _types[pinned] = node_map(definition or {})
        if len(_types) > 2048:
            _types.pop(next(iter(_types)))
    types = _types.get(pinned, {})

    def record() -> None:
        metrics.RUNS_FINISHED.labels(status=status).inc()
        if duration is not None:
            metrics.RUN_DURATION.labels(status=status).observe(duration / 1000)
        for r in rows:
            hit = types.get(r.node_id) or types.get(r.node_id.rsplit(".", 1)[-1])
            kind = hit[0] if hit else "unknown"
            if r.duration_ms is not None:
                metrics.NODE_DURATION.labels(type=kind, status=r.status).observe(
                    r.duration_ms / 1000
                )
            if (r.attempt or 0) > 1:
                metrics.RETRIES.labels(type=kind).inc(r.attempt - 1)
            if r.model:
                model = str(r.model)[:100]
                metrics.TOKENS.labels(model=model, kind="input").inc(r.input_tokens or 0)
                metrics.TOKENS.labels(model=model, kind="output").inc(r.output_tokens or 0)
                metrics.COST.labels(model=model).inc(max(0.0, r.cost_usd or 0.0))

    async def after() -> None:
        record()

    uow.after_commit(after)


@signals.task_prerun.connect
def _run_started(task: Any = None, args: Any = None, **_: Any) -> None:
    name = getattr(task, "name", None)
    if name not in EXECUTE_TASKS:
        return
    count = EXECUTE_TASKS[name]
    if count is None:
        count = len(args[0]) if args and isinstance(args[0], list) else 1
    metrics.RUNS_STARTED.inc(count)


@signals.worker_init.connect
def _fresh_directory(**_: Any) -> None:
    # Files a previous worker left in a reused directory would be added to ours.
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        for path in glob.glob(os.path.join(directory, "*.db")):
            os.unlink(path)


@signals.worker_process_init.connect
def _child_started(**_: Any) -> None:
    metrics.watch_log_events()


@signals.worker_process_shutdown.connect
def _child_stopped(pid: int | None = None, **_: Any) -> None:
    if metrics.MULTIPROCESS:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())  # type: ignore[no-untyped-call]


@signals.worker_ready.connect
def _serve(**_: Any) -> None:
    """The pool's one endpoint, in the main process (children write, this one reads)."""
    metrics.watch_log_events()
    settings = get_settings()
    port = settings.metrics.worker_port
    if not port:
        return
    from prometheus_client import start_http_server

    registry = metrics.registry(metrics.QueueDepth(settings.broker_url, QUEUES))
    try:
        start_http_server(port, addr=settings.metrics.address, registry=registry)
    except OSError as exc:
        log.warning("metrics.worker_port_unavailable", port=port, error=str(exc))
        return
    log.info(
        "metrics.worker_listening",
        address=settings.metrics.address,
        port=port,
        directory=os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
    )
