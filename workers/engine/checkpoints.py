"""A run's node states: what a resumed run loads, and every checkpoint the runner
writes (through the lifecycle, fenced by the lease), followed by its event."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.analytics.aggregate import node_map
from backend.executions import lifecycle, observers
from backend.executions import repository as repo
from backend.executions.lifecycle import Claim, NodeChange
from backend.executions.state import NodeStatus
from backend.workflows.graph import ApprovalLogic, Node, SetLogic, ValidGraph, WaitLogic
from workers.engine.dag import NodeState, topological_order
from workers.engine.graphs import cached_graph
from workers.engine.progress import Progress

if TYPE_CHECKING:  # attempt.py imports this module
    from workers.engine.attempt import Attempted

N = NodeStatus
# Due at once: a resumed run looks at its waiting nodes again before anything else.
LOOK_NOW = datetime(2000, 1, 1, tzinfo=UTC)


def now() -> datetime:
    return datetime.now(UTC)


@dataclass
class RunState:
    states: dict[str, NodeState] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    retry_at: dict[str, datetime] = field(default_factory=dict)
    # Nodes parked on a person or a time (approval, wait), and when each is due to be
    # looked at again (a resumed run looks at every one of them at once).
    waiting: dict[str, datetime] = field(default_factory=dict)
    # (started_at, finished_at) of each checkpointed node: what a wait took.
    spans: dict[str, tuple[datetime | None, datetime | None]] = field(default_factory=dict)
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    # What templates see as `nodes`, kept up to date as outputs arrive rather than
    # rebuilt for every node (that was O(nodes) per node on the hot path). Sharing it
    # between concurrent nodes is safe: the validator only lets a node read upstream.
    scope_nodes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record_output(self, node_id: str, output: Any) -> None:
        self.outputs[node_id] = output
        self.scope_nodes[node_id] = {"output": output}

    def status_of(self, node_id: str) -> NodeStatus:
        state = self.states.get(node_id)
        return state.status if state is not None else N.PENDING


async def load(sessionmaker: async_sessionmaker[AsyncSession], execution_id: uuid.UUID) -> RunState:
    """The checkpoints of a run that ran before (a resume or a retry)."""
    run = RunState()
    async with sessionmaker() as session:
        rows = await repo.top_level_checkpoints(session, execution_id)
    for row in rows:
        status = NodeStatus(row.status)
        # A node that was running (or cancelled in flight) when its worker lost the run
        # runs again: a cancelled run is terminal and never loaded.
        if status in (N.RUNNING, N.CANCELLED):
            continue
        run.states[row.node_id] = NodeState(status, row.branch)
        run.record_output(row.node_id, row.output)
        run.attempts[row.node_id] = row.attempt
        run.spans[row.node_id] = (row.started_at, row.finished_at)
        if status == N.WAITING:
            run.waiting[row.node_id] = LOOK_NOW
        if status == N.RETRYING and row.next_attempt_at is not None:
            run.retry_at[row.node_id] = row.next_attempt_at
    return run


class Checkpoints:
    """Writes node states for the runner: each one a lifecycle change (checked against
    the node state machine, fenced by the lease, recorded in the run's history), then
    its event. Raises LeaseLost when this worker no longer holds the run."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], progress: Progress) -> None:
        self.sessionmaker = sessionmaker
        self.progress = progress

    async def write(
        self,
        claim: Claim,
        node_id: str,
        old: NodeStatus | None,
        to: NodeStatus,
        values: dict[str, Any],
        *,
        iteration: int = 0,
        size: int | None = None,
        reason: str | None = None,
    ) -> None:
        change = NodeChange(node_id, old, to, values, iteration, reason)
        # Shielded: a cancel arriving mid-commit must not leave the row half-written in
        # the runner's view (the database itself is atomic either way).
        await asyncio.shield(lifecycle.record_nodes(self.sessionmaker, claim, [change]))
        self.progress.checkpointed(claim, node_id, to, values, iteration, size)
        if observers.active():
            observers.notify(
                observers.NodeCheckpoint(
                    claim.workflow_id, claim.version, node_id,
                    _node_type(claim, node_id), to.value, values,
                )
            )  # fmt: skip

    async def skip(self, claim: Claim, nodes: list[str], run: RunState) -> None:
        """Untaken branches and what only they lead to, in one statement."""
        if not nodes:
            return
        at = now()
        changes = [
            NodeChange(n, run.status_of(n), N.SKIPPED, {"started_at": at, "finished_at": at})
            for n in nodes
        ]
        await asyncio.shield(lifecycle.record_nodes(self.sessionmaker, claim, changes))
        for node_id in nodes:
            self.progress.checkpointed(claim, node_id, N.SKIPPED, {})

    async def outcome(
        self,
        claim: Claim,
        state: RunState,
        variables: dict[str, Any],
        node_id: str,
        node: Node,
        config: Any,
        done: Attempted,
    ) -> None:
        """Checkpoint how a node's attempts ended: failed, retrying (its next attempt
        due), waiting (a step that parks the run), or completed with its output; the
        run's in-memory state follows what was written."""
        if done.failure is not None:
            state.errors[node_id] = done.error()
            if done.retry_in is not None:
                at = now() + timedelta(seconds=done.retry_in)
                values = {
                    "attempt": done.attempt,
                    "error": done.error(),
                    "next_attempt_at": at,
                    "started_at": done.started,
                    "duration_ms": done.elapsed_ms,
                }
                await self.write(claim, node_id, N.RUNNING, N.RETRYING, values)
                state.states[node_id] = NodeState(N.RETRYING)
                state.retry_at[node_id] = at
                return
            branch = "error" if node.continue_on_error else None
            values = {
                "branch": branch,
                "attempt": done.attempt,
                "error": done.error(),
                "input": {"config": node.config},
                "started_at": done.started,
                "finished_at": now(),
                "duration_ms": done.elapsed_ms,
            }
            await self.write(claim, node_id, N.RUNNING, N.FAILED, values)
            state.states[node_id] = NodeState(N.FAILED, branch)
            return
        result = done.result
        assert result is not None
        # A node that waited counts from when its wait began (its duration is the wait).
        began, took = done.started, done.elapsed_ms
        if isinstance(config, ApprovalLogic | WaitLogic):
            began = state.spans.get(node_id, (None, None))[0] or done.started
            took = round((now() - began).total_seconds() * 1000, 3)
        if result.waits:
            until = result.wait_until or lifecycle.FOREVER
            values = {
                "attempt": done.attempt,
                "output": result.output,
                "input": {"config": node.config},
                "next_attempt_at": result.wait_until,
                "started_at": began,
            }
            await self.write(claim, node_id, N.RUNNING, N.WAITING, values)
            state.spans[node_id] = (began, None)
            state.states[node_id] = NodeState(N.WAITING)
            state.waiting[node_id] = until
            return
        variables.update(result.variables)
        values = {
            "branch": result.branch,
            "attempt": done.attempt,
            "output": result.output,
            "input": {"config": node.config},
            "started_at": began,
            "finished_at": now(),
            "duration_ms": took,
            "input_tokens": result.input_tokens,
            "output_tokens": result.output_tokens,
            "cost_usd": result.cost_usd,
        }
        await self.write(claim, node_id, N.RUNNING, N.COMPLETED, values, size=done.size)
        state.record_output(node_id, result.output)
        state.states[node_id] = NodeState(N.COMPLETED, result.branch)


# Node types by pinned version, loop bodies included, for observers (bounded like the
# graph cache: a process sees few versions).
_NODE_TYPES: dict[tuple[uuid.UUID, int], dict[str, tuple[str, str | None]]] = {}


def _node_type(claim: Claim, node_id: str) -> str:
    key = (claim.workflow_id, claim.version)
    types = _NODE_TYPES.get(key)
    if types is None:
        graph = cached_graph(*key)
        if graph is None:
            return "unknown"
        if len(_NODE_TYPES) >= 256:
            _NODE_TYPES.pop(next(iter(_NODE_TYPES)))
        types = _NODE_TYPES[key] = node_map(graph.definition)
    # A loop body's nodes are addressed as <loop>.<node>[...]: the last part names it.
    hit = types.get(node_id) or types.get(node_id.rsplit(".", 1)[-1])
    return hit[0] if hit else "unknown"


def waited_s(graph: ValidGraph, run: RunState) -> float:
    """Seconds this run spent parked on approval and wait nodes: they do not count
    against its timeout (a person may take days; the run's own work may not)."""
    total = 0.0
    at = now()
    for node_id, (started, finished) in run.spans.items():
        config = graph.configs.get(node_id)
        if started is None or not isinstance(config, ApprovalLogic | WaitLogic):
            continue
        end = finished if finished is not None else at
        total += max(0.0, (end - started).total_seconds())
    return total


def variables_of(initial: dict[str, Any], graph: ValidGraph, run: RunState) -> dict[str, Any]:
    """`vars` as the completed `set` nodes left them (a resumed run re-runs none)."""
    variables = dict(initial)
    for node_id in topological_order(graph.graph):
        done = run.states.get(node_id)
        if done and done.status == N.COMPLETED and isinstance(graph.configs[node_id], SetLogic):
            output = run.outputs.get(node_id)
            if isinstance(output, dict):
                variables.update(output)
    return variables
