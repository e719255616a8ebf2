"""The state machines of executions and node executions, and the one `transition()`
every status change goes through — API, runner and reaper alike (Prefect's lesson:
never bypass orchestration). Pure: it checks and returns, the caller persists."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from backend.kit.errors import InvalidTransition


class ExecutionStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class NodeStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    # Parked on a person or a time (approval, wait): the run holds no worker slot.
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


E, N = ExecutionStatus, NodeStatus

EXECUTION_TRANSITIONS: dict[ExecutionStatus, frozenset[ExecutionStatus]] = {
    E.PENDING: frozenset({E.RUNNING, E.CANCELLED, E.FAILED}),
    # running -> pending: a retry wait or a lost lease hands the run back to the queue.
    E.RUNNING: frozenset({E.COMPLETED, E.FAILED, E.CANCELLED, E.PENDING}),
    E.COMPLETED: frozenset(),
    E.FAILED: frozenset(),
    E.CANCELLED: frozenset(),
}

NODE_TRANSITIONS: dict[NodeStatus, frozenset[NodeStatus]] = {
    N.PENDING: frozenset({N.RUNNING, N.SKIPPED, N.CANCELLED}),
    N.RUNNING: frozenset({N.COMPLETED, N.FAILED, N.RETRYING, N.WAITING, N.CANCELLED}),
    N.RETRYING: frozenset({N.RUNNING, N.FAILED, N.CANCELLED}),
    # A waiting node is looked at again on every resume (running), and ends with what
    # it waited for (completed/failed, as the history records it) or with its run.
    N.WAITING: frozenset({N.RUNNING, N.COMPLETED, N.FAILED, N.CANCELLED}),
    N.COMPLETED: frozenset(),
    N.FAILED: frozenset(),
    N.SKIPPED: frozenset(),
    N.CANCELLED: frozenset(),
}

TERMINAL_EXECUTION = frozenset({E.COMPLETED, E.FAILED, E.CANCELLED})
TERMINAL_NODE = frozenset({N.COMPLETED, N.FAILED, N.SKIPPED, N.CANCELLED})


@dataclass(frozen=True, slots=True)
class Transition:
    kind: str
    old: str
    new: str
    at: datetime
    reason: str | None = None


# By plain string, built once: transition() is called on every status change.
_TABLES: dict[str, dict[str, frozenset[str]]] = {
    "execution": {
        k.value: frozenset(v.value for v in vs) for k, vs in EXECUTION_TRANSITIONS.items()
    },
    "node": {k.value: frozenset(v.value for v in vs) for k, vs in NODE_TRANSITIONS.items()},
}


def transition(
    kind: str, old: str, new: str, *, at: datetime, reason: str | None = None
) -> Transition:
    """Check `old -> new` for an "execution" or a "node"; raise InvalidTransition if the
    table does not allow it. Staying in the same status is not a transition."""
    table = _TABLES.get(kind)
    if table is None:
        raise ValueError(f"unknown state machine {kind!r}")
    if old not in table or new not in table:
        raise InvalidTransition(f"unknown {kind} status {old if old not in table else new!r}")
    if new not in table[old]:
        raise InvalidTransition(f"{kind} cannot go from {old} to {new}", field="status")
    return Transition(kind=kind, old=old, new=new, at=at, reason=reason)
