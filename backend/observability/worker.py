"""Worker metrics: runs started (Celery's task_prerun for the execute tasks), runs
finished (a lifecycle finished listener: counted once the run's end commits), node
durations, retries, tokens and cost (an observer of the engine's node checkpoints, from
what the engine holds: no query), lease losses and reaper actions (their log events),
and queue depth (read from the broker when scraped). The worker's main process serves
them all, summed over the prefork pool, on METRICS__WORKER_PORT."""

from __future__ import annotations

import glob
import os
from typing import Any

from celery import signals

from backend.config import get_settings
from backend.executions import lifecycle, observers
from backend.kit.celery_app import QUEUES
from backend.kit.db import UnitOfWork
from backend.kit.logging import get_logger
from backend.models import WorkflowExecution
from backend.observability import metrics

log = get_logger(__name__)
EXECUTE_TASKS = {"workflow.execute": 1, "workflow.execute_many": None}

TERMINAL_NODE = {"completed", "failed", "cancelled"}


@lifecycle.on_finished
async def run_finished(uow: UnitOfWork, execution: WorkflowExecution) -> None:
    """Counted when the run's end commits with it: a rolled-back end counts nothing.
    No query here: node figures come from the engine's checkpoints (node_checkpoint)."""
    status = str(execution.status)
    duration = execution.duration_ms

    async def after() -> None:
        metrics.RUNS_FINISHED.labels(status=status).inc()
        if duration is not None:
            metrics.RUN_DURATION.labels(status=status).observe(duration / 1000)

    uow.after_commit(after)


@observers.on_node_checkpoint
def node_checkpoint(cp: observers.NodeCheckpoint) -> None:
    """A node's end, as the engine wrote it: duration, retries, tokens and cost."""
    if cp.status not in TERMINAL_NODE:
        return
    values = cp.values
    duration_ms = values.get("duration_ms")
    if duration_ms is not None:
        metrics.NODE_DURATION.labels(type=cp.node_type, status=cp.status).observe(
            duration_ms / 1000
        )
    attempt = values.get("attempt") or 0
    if attempt > 1:
        metrics.RETRIES.labels(type=cp.node_type).inc(attempt - 1)
    output = values.get("output")
    model = output.get("model") if isinstance(output, dict) else None
    if model:
        model = str(model)[:100]
        metrics.TOKENS.labels(model=model, kind="input").inc(values.get("input_tokens") or 0)
        metrics.TOKENS.labels(model=model, kind="output").inc(values.get("output_tokens") or 0)
        metrics.COST.labels(model=model).inc(max(0.0, values.get("cost_usd") or 0.0))


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
