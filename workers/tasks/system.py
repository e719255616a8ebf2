"""System tasks: a ping that proves the broker, a worker and the result backend work."""

from __future__ import annotations

import os
import socket
from typing import Any

from backend.kit.celery_app import celery_app
from backend.kit.logging import current_request_id, get_logger

log = get_logger(__name__)


@celery_app.task(name="system.ping", ignore_result=False)
def ping() -> dict[str, Any]:
    log.info("system.ping")
    return {
        "pong": True,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "request_id": current_request_id(),
    }


@celery_app.task(name="system.noop", ignore_result=False)
def noop(*_: Any) -> None:
    """Does nothing: the floor a benchmark compares a workflow step against."""


@celery_app.task(name="system.increment", ignore_result=False)
def increment(x: int) -> int:
    """x + 1: a plain Celery chain of these is the floor the engine's throughput is
    measured against (each step computes from the previous one's output)."""
    return x + 1
