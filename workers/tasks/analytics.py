"""`analytics.aggregate` (beat, `default` queue): fold the runs that changed since the
last pass into the hourly aggregates. Safe to run twice or in parallel: a pass rebuilds
whole hours from the runs, under a per-workspace lock. Importing this module also wires
the worker's metrics (backend/observability/worker.py) into every worker process."""

from __future__ import annotations

from typing import Any

from backend.analytics.aggregate import aggregate_pass
from backend.kit.celery_app import celery_app
from backend.observability import worker as _worker_metrics  # noqa: F401 - registers the signals
from workers.tasks.executions import process


@celery_app.task(name="analytics.aggregate")
def aggregate() -> dict[str, Any]:
    p = process()
    return p.run(aggregate_pass(p.sessionmaker))
