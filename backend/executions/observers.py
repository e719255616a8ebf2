"""In-process observers of node checkpoints.

Whatever wants to count node outcomes (the worker's Prometheus metrics) registers here
and is called by the engine right after a node's state is written, with what the engine
already holds: no query on a run's closing transaction (reading every node row back at
the close cost each run a round trip, on the path the throughput benchmark measures).
An observer must be quick and must not raise; one that does is logged and skipped.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from backend.kit.logging import get_logger

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class NodeCheckpoint:
    workflow_id: uuid.UUID
    version: int
    node_id: str
    # The node's type in the pinned definition ("unknown" if it is not there).
    node_type: str
    status: str
    # The checkpoint's columns as written (duration_ms, attempt, tokens, cost, output...).
    values: dict[str, Any]


NodeObserver = Callable[[NodeCheckpoint], None]
_observers: list[NodeObserver] = []


def on_node_checkpoint(observer: NodeObserver) -> NodeObserver:
    if observer not in _observers:
        _observers.append(observer)
    return observer


def active() -> bool:
    return bool(_observers)


def notify(checkpoint: NodeCheckpoint) -> None:
    for observer in _observers:
        try:
            observer(checkpoint)
        except Exception:
            log.exception("observer.failed", observer=getattr(observer, "__name__", "?"))
