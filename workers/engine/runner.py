"""The runner: claims an execution, runs its DAG, checkpoints every node.

One Celery task runs a whole execution inside one event loop: nodes of a generation
run concurrently (they are I/O-bound), each node's result is committed as soon as it
finishes (one upsert), so a worker that dies loses at most the nodes in flight. On
redelivery the run resumes from its checkpoints; completed nodes never run again.

A lease on the execution row makes a second delivery of the same message a no-op while
the first is alive; a watcher renews the lease and notices cancel requests promptly.
Retry waits longer than `engine.inline_retry_max_s` park the run (status back to
pending, `resume_at` set) and re-enqueue it with a countdown, so no worker slot waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import bindparam, exists, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.executions.service import cancel_tree
from backend.executions.state import TERMINAL_EXECUTION, ExecutionStatus, NodeStatus, transition
from backend.kit.db import UnitOfWork
from backend.kit.logging import get_logger
from backend.models import NodeExecution, Workflow, WorkflowExecution, WorkflowVersion
from backend.realtime.events import (
    EXECUTION_STATUS,
    NODE_STATUS,
    Emitter,
    event,
    publish_after_commit,
)
from backend.triggers.hooks import execution_finished
from backend.workflows.graph import (
    LOOP_ROOTS,
    Context,
    ForEachLogic,
    GraphInvalid,
    SetLogic,
    SubWorkflowIntegration,
    ValidGraph,
    WhileLogic,
    validate,
)
from backend.workflows.service import validation_context
from workers.engine.dag import (
    NodeState,
    failed_nodes,
    is_finished,
    merge_any_nodes,
    skip_closure,
    topological_order,
)
from workers.engine.retry import NodeFailure, classify, retry_delay
from workers.nodes import HANDLERS
from workers.nodes.base import NodeContext, NodeResult, SubRun

log = get_logger(__name__)
E, N = ExecutionStatus, NodeStatus
# Validated graphs by (workflow id, version): versions never change, so validating
# once per process is enough (references are checked again by the nodes that use them).
_GRAPHS: dict[tuple[uuid.UUID, int], ValidGraph] = {}
_GRAPH_CACHE_SIZE = 256
# Node outputs up to this size ride along in their node.status event.
EVENT_OUTPUT_MAX = 16_384
# The (execution, node, iteration) unique constraint checkpoints upsert on.
NODE_KEY = "uq_node_executions_execution_id_node_id_iteration"
IDEMPOTENCY_KEY = "uq_workflow_executions_workspace_id_idempotency_key"
# A checkpoint writes the node's whole state; built once, executed with parameters
# (building an insert per node cost more than the round trip to PostgreSQL).
CHECKPOINT_DEFAULTS: dict[str, Any] = {
    "status": None,
    "branch": None,
    "attempt": 0,
    "input": None,
    "output": None,
    "error": None,
    "next_attempt_at": None,
    "started_at": None,
    "finished_at": None,
    "duration_ms": None,
    "input_tokens": 0,
    "output_tokens": 0,
    "cost_usd": 0.0,
}
_COLUMNS = ["id", "execution_id", "node_id", "iteration", *CHECKPOINT_DEFAULTS]
_TABLE = NodeExecution.__table__
# Fenced: the row is written only while this claim still holds the run's lease (the
# lease row is share-locked, so a reaper or a new claim cannot slip in between), and
# never over a node that already completed or was skipped. A zombie worker whose lease
# lapsed writes nothing.
_LEASED = (
    select(WorkflowExecution.id)
    .where(
        WorkflowExecution.id == bindparam("execution_id"),
        WorkflowExecution.lease_owner == bindparam("lease"),
    )
    .with_for_update(read=True)
)
_upsert = insert(NodeExecution).from_select(
    _COLUMNS,
    select(*[bindparam(c, type_=_TABLE.c[c].type) for c in _COLUMNS]).where(exists(_LEASED)),
)
CHECKPOINT = _upsert.on_conflict_do_update(
    constraint=NODE_KEY,
    set_={**{c: _upsert.excluded[c] for c in CHECKPOINT_DEFAULTS}, "updated_at": func.now()},
    # Literal SQL: an expanding IN list cannot be used with executemany (batched skips).
    where=text("node_executions.status NOT IN ('completed', 'skipped')"),
)


class LeaseLost(Exception):
    """This worker no longer holds the run: another one does, or will."""


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Claim:
    id: uuid.UUID
    workspace_id: uuid.UUID
    workflow_id: uuid.UUID
    version: int
    trigger_type: str
    trigger_data: dict[str, Any]
    variables: dict[str, Any]
    started_at: datetime
    depth: int = 0
    # This claim's lease token: the worker plus a nonce, so two claims by the same
    # process (or a process reusing a pid) can never mistake each other's lease.
    token: str = ""
    claimed_at: float = field(default_factory=time.monotonic)
    # First claim of a run that copied nothing (not a retry): no checkpoints to load.
    fresh: bool = False
    # Why this worker stopped running the run early: "cancel" (asked to), "deadline",
    # "lost" (the lease went to someone else) or "abandoned" (an unexpected error).
    # Sub-runs are cancelled with their parent only for the first two.
    stop: str | None = None

    @classmethod
    def of(cls, row: Any, token: str, *, fresh: bool = False) -> Claim:
        """From a claimed execution (an ORM row or a RETURNING row)."""
        return cls(
            id=row.id,
            workspace_id=row.workspace_id,
            workflow_id=row.workflow_id,
            version=row.version,
            trigger_type=row.trigger_type,
            trigger_data=row.trigger_data,
            variables=dict(row.variables),
            started_at=row.started_at,
            depth=row.depth,
            token=token,
            fresh=fresh,
        )


@dataclass
class RunState:
    states: dict[str, NodeState] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    retry_at: dict[str, datetime] = field(default_factory=dict)
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    # What templates see as `nodes`, kept up to date as outputs arrive rather than
    # rebuilt for every node (that was O(nodes) per node on the hot path). Sharing it
    # between concurrent nodes is safe: the validator only lets a node read upstream.
    scope_nodes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record_output(self, node_id: str, output: Any) -> None:
        self.outputs[node_id] = output
        self.scope_nodes[node_id] = {"output": output}


Enqueue = Callable[[uuid.UUID, float], None]


class Runner:
    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        http: httpx.AsyncClient,
        worker_id: str,
        enqueue: Enqueue,
    ) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.http = http
        self.worker_id = worker_id
        self.enqueue = enqueue
        self.events = Emitter()

    def _emit(
        self,
        claim: Claim,
        type_: str,
        *,
        node_id: str | None = None,
        status: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        if claim.stop == "lost":
            return  # someone else runs it now: they tell the story
        self.events.emit(
            claim.id,
            claim.workspace_id,
            event(type_, claim.id, node_id=node_id, status=status, data=data),
        )

    def _node_emit(self, claim: Claim, node_id: str, type_: str, data: dict[str, Any]) -> None:
        self._emit(claim, type_, node_id=node_id, data=data)

    def _node_event(
        self,
        claim: Claim,
        node_id: str,
        values: dict[str, Any],
        iteration: int = 0,
        size: int | None = None,
    ) -> None:
        """A checkpoint, as followers see it (big outputs stay in the node's row)."""
        data = {
            k: values[k]
            for k in ("attempt", "duration_ms", "error", "branch", "next_attempt_at")
            if values.get(k) is not None
        }
        if iteration:
            data["iteration"] = iteration
        if values.get("input_tokens") or values.get("output_tokens"):
            data.update(
                input_tokens=values["input_tokens"],
                output_tokens=values["output_tokens"],
                cost_usd=values["cost_usd"],
            )
        if "output" in values and values["status"] == N.COMPLETED:
            if size is None:
                size = len(json.dumps(values["output"], default=str))
            if size <= EVENT_OUTPUT_MAX:
                data["output"] = values["output"]
            else:
                data["output_bytes"] = size
        self._emit(claim, NODE_STATUS, node_id=node_id, status=str(values["status"]), data=data)

    # Claiming and releasing -------------------------------------------------------------

    async def _claim(self, execution_id: uuid.UUID) -> Claim | None:
        return await self._claim_fast(execution_id) or await self._claim_slow(execution_id)

    async def _claim_fast(self, execution_id: uuid.UUID) -> Claim | None:
        """The common case in one statement: a run nobody holds, not parked, not
        cancelled, under the delivery cap. Anything else goes the slow way, which says
        why it cannot be claimed (or ends the run)."""
        now = _now()
        engine = self.settings.engine
        token = f"{self.worker_id}/{uuid.uuid4().hex[:12]}"
        ex = WorkflowExecution
        async with UnitOfWork(self.sessionmaker) as uow:
            row = (
                await uow.session.execute(
                    update(ex)
                    .where(
                        ex.id == execution_id,
                        ex.status.in_([E.PENDING, E.RUNNING]),
                        or_(
                            ex.lease_owner.is_(None),
                            ex.lease_expires_at.is_(None),
                            ex.lease_expires_at <= now,
                        ),
                        or_(ex.resume_at.is_(None), ex.resume_at <= now),
                        ex.cancel_requested_at.is_(None),
                        ex.deliveries < engine.max_deliveries,
                    )
                    .values(
                        status=E.RUNNING,
                        deliveries=ex.deliveries + 1,
                        started_at=func.coalesce(ex.started_at, now),
                        lease_owner=token,
                        lease_expires_at=now + timedelta(seconds=engine.lease_s),
                        resume_at=None,
                    )
                    .returning(
                        ex.id, ex.workspace_id, ex.workflow_id, ex.version, ex.trigger_type,
                        ex.trigger_data, ex.variables, ex.started_at, ex.depth, ex.retry_of,
                    )
                    .execution_options(synchronize_session=False)
                )
            ).one_or_none()  # fmt: skip
        if row is None:
            return None
        # started_at was empty until now: never ran, so nothing was checkpointed.
        return Claim.of(row, token, fresh=row.started_at == now and row.retry_of is None)

    async def _claim_slow(self, execution_id: uuid.UUID) -> Claim | None:
        now = _now()
        engine = self.settings.engine
        async with UnitOfWork(self.sessionmaker) as uow:
            ex = await uow.session.get(WorkflowExecution, execution_id, with_for_update=True)
            if ex is None or ex.status in TERMINAL_EXECUTION:
                return None
            if ex.lease_owner and ex.lease_expires_at and ex.lease_expires_at > now:
                log.info(
                    "execution.lease_held", execution_id=str(execution_id), owner=ex.lease_owner
                )
                return None
            if ex.resume_at and ex.resume_at > now:
                return None
            if ex.cancel_requested_at is not None:
                self._finish(ex, E.CANCELLED, now, error={"message": "cancelled before it ran"})
                publish_after_commit(uow, ex)
                await execution_finished(uow, ex)
                return None
            ex.deliveries += 1
            if ex.deliveries > engine.max_deliveries:
                self._finish(
                    ex,
                    E.FAILED,
                    now,
                    error={"message": f"gave up after {engine.max_deliveries} deliveries"},
                )
                publish_after_commit(uow, ex)
                await execution_finished(uow, ex)
                return None
            if ex.status == E.PENDING:
                transition("execution", ex.status, E.RUNNING, at=now)
                ex.status = E.RUNNING
            ex.started_at = ex.started_at or now
            token = f"{self.worker_id}/{uuid.uuid4().hex[:12]}"
            ex.lease_owner = token
            ex.lease_expires_at = now + timedelta(seconds=engine.lease_s)
            ex.resume_at = None
            return Claim.of(ex, token)

    def _finish(
        self, ex: WorkflowExecution, status: ExecutionStatus, now: datetime, **values: Any
    ) -> None:
        transition("execution", ex.status, status, at=now)
        ex.status = status
        ex.finished_at = now
        if ex.started_at is not None:
            ex.duration_ms = round((now - ex.started_at).total_seconds() * 1000, 3)
        ex.lease_owner = None
        ex.lease_expires_at = None
        for key, value in values.items():
            setattr(ex, key, value)

    async def _graph(self, claim: Claim) -> ValidGraph:
        key = (claim.workflow_id, claim.version)
        cached = _GRAPHS.get(key)
        if cached is not None:
            return cached
        async with self.sessionmaker() as session:
            definition = await session.scalar(
                select(WorkflowVersion.definition).where(
                    WorkflowVersion.workflow_id == claim.workflow_id,
                    WorkflowVersion.number == claim.version,
                )
            )
            if definition is None:
                raise GraphInvalid([])
            ctx = await validation_context(session, claim.workspace_id, claim.workflow_id)
        graph = validate(definition, ctx)
        if len(_GRAPHS) >= _GRAPH_CACHE_SIZE:
            _GRAPHS.pop(next(iter(_GRAPHS)))
        _GRAPHS[key] = graph
        return graph

    async def _load(self, execution_id: uuid.UUID) -> RunState:
        run = RunState()
        async with self.sessionmaker() as session:
            rows = await session.scalars(
                select(NodeExecution).where(
                    NodeExecution.execution_id == execution_id, NodeExecution.iteration == 0
                )
            )
            for row in rows.all():
                status = NodeStatus(row.status)
                # A node that was running (or cancelled in flight) when its worker lost
                # the run runs again: a cancelled run is terminal and never loaded.
                if status in (N.RUNNING, N.CANCELLED):
                    continue
                run.states[row.node_id] = NodeState(status, row.branch)
                run.record_output(row.node_id, row.output)
                run.attempts[row.node_id] = row.attempt
                if status == N.RETRYING and row.next_attempt_at is not None:
                    run.retry_at[row.node_id] = row.next_attempt_at
        return run

    # Checkpoints --------------------------------------------------------------------------

    async def _checkpoint(
        self,
        claim: Claim,
        node_id: str,
        values: dict[str, Any],
        iteration: int = 0,
        size: int | None = None,
    ) -> None:
        """Write the node's state, fenced by the lease; `size`: the output's JSON size
        when the caller already measured it (so the event need not measure again)."""
        params = {**CHECKPOINT_DEFAULTS, **values}
        params.update(
            id=uuid.uuid4(), execution_id=claim.id, node_id=node_id, iteration=iteration,
            lease=claim.token,
        )  # fmt: skip
        # Shielded: a cancel arriving mid-commit must not leave the row half-written
        # in the runner's view (the database itself is atomic either way).
        if await asyncio.shield(self._write(CHECKPOINT, params)) == 0:
            raise LeaseLost(f"lost the lease on {claim.id} before checkpointing {node_id}")
        self._node_event(claim, node_id, values, iteration, size)

    async def _write(self, stmt: Any, params: Any = None) -> int:
        # A checkpoint is one statement in its own transaction, straight on a pooled
        # connection: no ORM session to build for a single upsert on the hot path.
        engine = self.sessionmaker.kw["bind"]
        for attempt in (1, 2):
            try:
                async with engine.begin() as conn:
                    result = await conn.execute(stmt, params)
                return int(result.rowcount)
            except DBAPIError as exc:
                # Workers skip the pool's pre-ping (a round trip per node): a connection
                # PostgreSQL dropped fails once, is discarded, and the write goes again.
                if not exc.connection_invalidated or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _skip(self, claim: Claim, nodes: list[str]) -> None:
        if not nodes:
            return
        now = _now()
        rows = [
            {
                **CHECKPOINT_DEFAULTS, "id": uuid.uuid4(), "execution_id": claim.id, "node_id": n,
                "iteration": 0, "status": N.SKIPPED, "started_at": now, "finished_at": now,
                "lease": claim.token,
            }
            for n in nodes
        ]  # fmt: skip
        if await asyncio.shield(self._write(CHECKPOINT, rows)) == 0:
            raise LeaseLost(f"lost the lease on {claim.id} before skipping {nodes[0]}")
        for node_id in nodes:
            self._emit(claim, NODE_STATUS, node_id=node_id, status=N.SKIPPED)

    # Running ------------------------------------------------------------------------------

    async def execute(self, execution_id: uuid.UUID) -> str:
        claim = await self._claim(execution_id)
        if claim is None:
            return "not_claimed"
        try:
            return await self._execute(claim)
        finally:
            await self.events.drain(claim.id)

    async def _execute(self, claim: Claim) -> str:
        self._emit(
            claim,
            EXECUTION_STATUS,
            status=E.RUNNING,
            data={"workflow_id": str(claim.workflow_id), "workspace_id": str(claim.workspace_id)},
        )
        try:
            graph = await self._graph(claim)
        except GraphInvalid as exc:
            await self._close(
                claim,
                E.FAILED,
                error={
                    "message": "the pinned version no longer validates",
                    "problems": [p.as_dict() for p in exc.problems],
                },
            )
            return E.FAILED
        run = RunState() if claim.fresh else await self._load(claim.id)
        cancel = asyncio.Event()
        lost = asyncio.Event()
        watcher = asyncio.create_task(self._watch(claim, cancel, lost))
        try:
            return await self._run(claim, graph, run, cancel, lost)
        except LeaseLost:
            log.warning("execution.lease_lost", execution_id=str(claim.id))
            return "lost_lease"
        except BaseException:
            # Something unexpected (a database outage): hand the run back at once
            # rather than after the lease runs out; its checkpoints make that safe.
            with contextlib.suppress(Exception):
                await self._release(claim)
            raise
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _release(self, claim: Claim) -> None:
        async with UnitOfWork(self.sessionmaker) as uow:
            await uow.session.execute(
                update(WorkflowExecution)
                .where(
                    WorkflowExecution.id == claim.id, WorkflowExecution.lease_owner == claim.token
                )
                .values(lease_expires_at=func.now())
            )

    async def _watch(self, claim: Claim, cancel: asyncio.Event, lost: asyncio.Event) -> None:
        engine = self.settings.engine
        renew_every = engine.lease_s / 3
        last_renewal = time.monotonic()
        while True:
            await asyncio.sleep(engine.watch_interval_s)
            try:
                renew = time.monotonic() - last_renewal >= renew_every
                if await self._look(claim, cancel, lost, renew=renew):
                    return
                if renew:
                    last_renewal = time.monotonic()
            except Exception:
                # A database blip must not silently end the watch: log, try again.
                log.exception("execution.watch_failed", execution_id=str(claim.id))
                if time.monotonic() - last_renewal > engine.lease_s * 0.8:
                    # The lease may lapse before we can renew it: stop before the
                    # reaper hands the run to another worker, so nothing runs twice.
                    claim.stop = "lost"
                    lost.set()
                    cancel.set()
                    return

    async def _look(
        self, claim: Claim, cancel: asyncio.Event, lost: asyncio.Event, *, renew: bool
    ) -> bool:
        execution_id = claim.id
        """One look at the run's row; True when the watch is over (the lease is gone)."""
        async with UnitOfWork(self.sessionmaker) as uow:
            row = (
                await uow.session.execute(
                    select(
                        WorkflowExecution.cancel_requested_at, WorkflowExecution.lease_owner
                    ).where(WorkflowExecution.id == execution_id)
                )
            ).one_or_none()
            if row is None or row.lease_owner != claim.token:
                claim.stop = "lost"
                lost.set()
                cancel.set()
                return True
            if row.cancel_requested_at is not None:
                claim.stop = claim.stop or "cancel"
                cancel.set()
            if renew:
                await uow.session.execute(
                    update(WorkflowExecution)
                    .where(
                        WorkflowExecution.id == execution_id,
                        WorkflowExecution.lease_owner == claim.token,
                    )
                    .values(
                        lease_expires_at=_now() + timedelta(seconds=self.settings.engine.lease_s)
                    )
                )
        return False

    async def _run(
        self,
        claim: Claim,
        graph: ValidGraph,
        run: RunState,
        cancel: asyncio.Event,
        lost: asyncio.Event,
    ) -> str:
        running: dict[str, asyncio.Task[None]] = {}
        try:
            return await self._loop(claim, graph, run, cancel, lost, running)
        finally:
            # Whatever way the loop ended, no node task outlives it: the worker's event
            # loop is reused by the next task, and a stray task would write later.
            leftover = [task for task in running.values() if not task.done()]
            if leftover:
                claim.stop = claim.stop or "abandoned"
            for task in leftover:
                task.cancel()
            await asyncio.gather(*leftover, return_exceptions=True)

    async def _loop(
        self,
        claim: Claim,
        graph: ValidGraph,
        run: RunState,
        cancel: asyncio.Event,
        lost: asyncio.Event,
        running: dict[str, asyncio.Task[None]],
    ) -> str:
        merge_any = merge_any_nodes(graph.configs)
        continue_on_error = frozenset(
            n for n, node in graph.nodes.items() if node.continue_on_error
        )
        start = next(
            (
                n
                for n, cfg in graph.configs.items()
                if graph.nodes[n].type == "trigger"
                and getattr(cfg, "kind", None) == claim.trigger_type
            ),
            None,
        )
        limit = asyncio.Semaphore(min(graph.settings.max_concurrency, 64))
        # `vars` as the completed `set` nodes left them (a resumed run re-runs none).
        variables = dict(claim.variables)
        for node_id in topological_order(graph.graph):
            state = run.states.get(node_id)
            if (
                state
                and state.status == N.COMPLETED
                and isinstance(graph.configs[node_id], SetLogic)
            ):
                output = run.outputs.get(node_id)
                if isinstance(output, dict):
                    variables.update(output)
        deadline = claim.started_at + timedelta(seconds=graph.settings.timeout_s)

        while True:
            if cancel.is_set():
                break
            if _now() > deadline:
                claim.stop = "deadline"
                for task in running.values():
                    task.cancel()
                await asyncio.gather(*running.values(), return_exceptions=True)
                await self._close(
                    claim,
                    E.FAILED,
                    run=run,
                    error={"message": f"execution timed out after {graph.settings.timeout_s} s"},
                )
                return E.FAILED
            ready, settled = skip_closure(graph.graph, run.states, merge_any, start)
            skipped = [
                n for n, s in settled.items() if s.status == N.SKIPPED and run.states.get(n) != s
            ]
            await self._skip(claim, skipped)
            run.states.update(settled)
            now = _now()
            due = [n for n, at in run.retry_at.items() if at <= now and n not in running]
            for node_id in [*ready, *due]:
                if node_id in running:
                    continue
                run.retry_at.pop(node_id, None)
                run.states[node_id] = NodeState(N.RUNNING)
                running[node_id] = asyncio.create_task(
                    self._run_node(claim, graph, run, node_id, variables, limit)
                )
            fatal = failed_nodes(run.states, continue_on_error)
            if fatal and not running:
                break
            if not running:
                if run.retry_at:
                    await self._park(claim, run, min(run.retry_at.values()))
                    return "parked"
                break
            waiters: set[asyncio.Future[Any]] = set(running.values())
            cancel_wait = asyncio.ensure_future(cancel.wait())
            waiters.add(cancel_wait)
            # Wake for the run's deadline too, not only when a node finishes.
            remaining = max(0.0, (deadline - _now()).total_seconds())
            await asyncio.wait(
                waiters, timeout=remaining + 0.01, return_when=asyncio.FIRST_COMPLETED
            )
            cancel_wait.cancel()
            for node_id, task in list(running.items()):
                if task.done():
                    del running[node_id]
                    with contextlib.suppress(asyncio.CancelledError):
                        task.result()
            if failed_nodes(run.states, continue_on_error):
                # Let siblings in flight finish their checkpoint, start nothing new.
                await asyncio.gather(*running.values(), return_exceptions=True)
                running.clear()
                break

        if cancel.is_set():
            for task in running.values():
                task.cancel()
            await asyncio.gather(*running.values(), return_exceptions=True)
            if lost.is_set():
                # Someone else holds the run now (our lease lapsed): leave it to them.
                return "lost_lease"
            await self._close(claim, E.CANCELLED, run=run, error={"message": "cancelled"})
            return E.CANCELLED
        fatal = failed_nodes(run.states, continue_on_error)
        if fatal:
            first = fatal[0]
            await self._close(
                claim, E.FAILED, run=run, error={"node_id": first, **run.errors.get(first, {})}
            )
            return E.FAILED
        if not is_finished(graph.graph, run.states):
            await self._close(
                claim,
                E.FAILED,
                run=run,
                error={"message": "the run stopped with nodes that can never run"},
            )
            return E.FAILED
        sinks = [
            n
            for n in graph.graph.nodes
            if graph.graph.out_degree(n) == 0 and run.states[n].status == N.COMPLETED
        ]
        await self._close(
            claim,
            E.COMPLETED,
            run=run,
            output={n: run.outputs.get(n) for n in sinks},
            variables=variables,
        )
        return E.COMPLETED

    async def _run_node(
        self,
        claim: Claim,
        graph: ValidGraph,
        run: RunState,
        node_id: str,
        variables: dict[str, Any],
        limit: asyncio.Semaphore,
    ) -> None:
        node = graph.nodes[node_id]
        config = graph.configs[node_id]
        policy = node.retry
        handler = HANDLERS[node.type]
        upstream = list(graph.graph.predecessors(node_id))
        scope = {
            "trigger": claim.trigger_data,
            "nodes": run.scope_nodes,
            "vars": variables,
            "execution": {
                "id": str(claim.id),
                "workflow_id": str(claim.workflow_id),
                "version": claim.version,
            },
            "inputs": [
                p for p in upstream if run.states.get(p, NodeState(N.PENDING)).status == N.COMPLETED
            ],
        }
        ctx = NodeContext(
            node=node,
            config=config,
            execution_id=claim.id,
            workspace_id=claim.workspace_id,
            settings=self.settings,
            scope=scope,
            http=self.http,
            sessionmaker=self.sessionmaker,
        )
        ctx.emit = functools.partial(self._node_emit, claim, node_id)
        if isinstance(config, ForEachLogic | WhileLogic):
            ctx.run_body = await self._body_runner(claim, graph, node_id, config, scope, ctx)
        elif isinstance(config, SubWorkflowIntegration):
            ctx.run_workflow = functools.partial(self._sub_run, claim, node_id, 0, ctx)
        async with limit:
            while True:
                attempt = run.attempts.get(node_id, 0) + 1
                run.attempts[node_id] = attempt
                ctx.attempt = attempt
                self._emit(
                    claim, NODE_STATUS, node_id=node_id, status=N.RUNNING, data={"attempt": attempt}
                )
                started = _now()
                t0 = time.perf_counter()
                try:
                    timeout = self._node_timeout(claim, graph, node.timeout_s)
                    async with asyncio.timeout(timeout):
                        result = await handler(ctx)
                    size = self._check_size(result)
                except asyncio.CancelledError:
                    # With the lease gone this writes nothing, and must not: the new
                    # owner runs the node again.
                    with contextlib.suppress(LeaseLost):
                        await self._checkpoint(
                            claim,
                            node_id,
                            {
                                "status": N.CANCELLED,
                                "attempt": attempt,
                                "started_at": started,
                                "finished_at": _now(),
                            },
                        )
                    run.states[node_id] = NodeState(N.CANCELLED)
                    raise
                except Exception as exc:
                    failure = classify(exc)
                    delay = retry_delay(
                        failure,
                        attempt=attempt,
                        max_retries=policy.max_retries,
                        backoff_s=policy.backoff_s,
                        retry_on=list(policy.on),
                        max_countdown_s=self.settings.celery.max_countdown_s,
                    )
                    error = {
                        "message": failure.message,
                        "class": failure.error_class,
                        "attempt": attempt,
                    }
                    run.errors[node_id] = error
                    elapsed = round((time.perf_counter() - t0) * 1000, 3)
                    if delay is not None and delay <= self.settings.engine.inline_retry_max_s:
                        await asyncio.sleep(delay)
                        continue
                    if delay is not None:
                        at = _now() + timedelta(seconds=delay)
                        await self._checkpoint(
                            claim,
                            node_id,
                            {
                                "status": N.RETRYING,
                                "attempt": attempt,
                                "error": error,
                                "next_attempt_at": at,
                                "started_at": started,
                                "duration_ms": elapsed,
                            },
                        )
                        run.states[node_id] = NodeState(N.RETRYING)
                        run.retry_at[node_id] = at
                        return
                    branch = "error" if node.continue_on_error else None
                    await self._checkpoint(
                        claim,
                        node_id,
                        {
                            "status": N.FAILED,
                            "branch": branch,
                            "attempt": attempt,
                            "error": error,
                            "input": {"config": node.config},
                            "started_at": started,
                            "finished_at": _now(),
                            "duration_ms": elapsed,
                        },
                    )
                    run.states[node_id] = NodeState(N.FAILED, branch)
                    return
                elapsed = round((time.perf_counter() - t0) * 1000, 3)
                variables.update(result.variables)
                # Child runs' spend counts on the node that started them, so the run's
                # totals include everything it caused.
                result.input_tokens += int(ctx.usage[0])
                result.output_tokens += int(ctx.usage[1])
                result.cost_usd += ctx.usage[2]
                await self._checkpoint(
                    claim,
                    node_id,
                    {
                        "status": N.COMPLETED,
                        "branch": result.branch,
                        "attempt": attempt,
                        "output": result.output,
                        "input": {"config": node.config},
                        "error": None,
                        "next_attempt_at": None,
                        "started_at": started,
                        "finished_at": _now(),
                        "duration_ms": elapsed,
                        "input_tokens": result.input_tokens,
                        "output_tokens": result.output_tokens,
                        "cost_usd": result.cost_usd,
                    },
                    size=size,
                )
                run.record_output(node_id, result.output)
                run.states[node_id] = NodeState(N.COMPLETED, result.branch)
                return

    async def _body_runner(
        self,
        claim: Claim,
        graph: ValidGraph,
        parent: str,
        config: ForEachLogic | WhileLogic,
        scope: dict[str, Any],
        ctx: NodeContext,
    ) -> Callable[[int, dict[str, Any]], Awaitable[Any]]:
        """How a loop runs its body for pass `index` (with the loop's names, `item` and
        `index` or `iteration` and `last`). A body graph's nodes are checkpointed as
        `<parent>.<node>` with iteration = index + 1, so a resumed loop reuses every
        pass that finished; a body workflow runs as one child run per pass."""
        if config.workflow_id is not None:
            workflow_id = config.workflow_id

            async def run_child(index: int, names: dict[str, Any]) -> Any:
                child = await self._sub_run(claim, parent, index + 1, ctx, workflow_id, names, True)
                if child.status != E.COMPLETED:
                    reason = (child.error or {}).get("message", "")
                    raise NodeFailure(
                        f"pass {index}: sub-workflow run {child.execution_id} {child.status}: "
                        f"{reason}".rstrip(": "),
                        "permanent",
                    )
                return child.output

            return run_child
        assert config.body is not None
        bodies: dict[str, ValidGraph] = graph.graph.graph.setdefault("_bodies", {})
        body = bodies.get(parent)
        if body is None:
            body = validate(
                config.body.model_dump(),
                Context(workflow_id=claim.workflow_id),
                require_trigger=False,
                extra_roots=LOOP_ROOTS[config.kind],
            )
            bodies[parent] = body
        done: dict[tuple[str, int], tuple[Any, str | None]] = {}
        async with self.sessionmaker() as session:
            rows = await session.execute(
                select(
                    NodeExecution.node_id,
                    NodeExecution.iteration,
                    NodeExecution.output,
                    NodeExecution.branch,
                ).where(
                    NodeExecution.execution_id == claim.id,
                    NodeExecution.node_id.startswith(parent + "."),
                    NodeExecution.status == N.COMPLETED,
                )
            )
            for node_id, iteration, output, branch in rows.all():
                done[(node_id.split(".", 1)[1], iteration)] = (output, branch)

        async def run_pass(index: int, names: dict[str, Any]) -> Any:
            states: dict[str, NodeState] = {}
            outputs: dict[str, Any] = {}
            while True:
                ready, states = skip_closure(body.graph, states)
                if not ready:
                    break
                for node_id in ready:
                    if (node_id, index + 1) in done:
                        outputs[node_id], branch = done[(node_id, index + 1)]
                        states[node_id] = NodeState(N.COMPLETED, branch)
                        continue
                    pass_scope = {
                        **scope,
                        **names,
                        "nodes": {
                            **scope["nodes"],
                            **{n: {"output": o} for n, o in outputs.items()},
                        },
                    }
                    result = await self._body_step(
                        claim, body, parent, node_id, index + 1, pass_scope
                    )
                    # Remembered, so an in-place retry of the loop skips it too.
                    done[(node_id, index + 1)] = (result.output, result.branch)
                    outputs[node_id] = result.output
                    states[node_id] = NodeState(N.COMPLETED, result.branch)
            sinks = [n for n in body.graph.nodes if body.graph.out_degree(n) == 0 and n in outputs]
            return outputs[sinks[0]] if len(sinks) == 1 else {n: outputs[n] for n in sinks}

        return run_pass

    async def _sub_run(
        self,
        claim: Claim,
        node_id: str,
        iteration: int,
        ctx: NodeContext,
        workflow_id: uuid.UUID,
        trigger_data: dict[str, Any],
        wait: bool,
    ) -> SubRun:
        """Start (or find again, after a crash) the child run of `node_id`, pass
        `iteration`, and unless not waiting, run it here until it ends. Running it in
        this task rather than through the queue means a parent never waits for a free
        worker slot that other waiting parents hold (a classic pool deadlock)."""
        depth = claim.depth + 1
        limit = self.settings.engine.max_sub_workflow_depth
        if depth > limit:
            raise NodeFailure(f"sub-workflows nest deeper than {limit} levels", "permanent")
        base = f"sub:{claim.id}:{node_id}:{iteration}#"
        async with UnitOfWork(self.sessionmaker) as uow:
            workflow = await uow.session.scalar(
                select(Workflow).where(
                    Workflow.id == workflow_id, Workflow.workspace_id == claim.workspace_id
                )
            )
            if workflow is None:
                raise NodeFailure("sub-workflow not found in this workspace", "permanent")
            if workflow.status == "archived":
                raise NodeFailure("the sub-workflow is archived", "permanent")
            # The idempotency key makes a redelivered parent find its child again
            # instead of starting a second one; a child that failed or was cancelled
            # (the node timed out and is being retried) is followed by a fresh one.
            latest = (
                await uow.session.execute(
                    select(
                        WorkflowExecution.id,
                        WorkflowExecution.status,
                        WorkflowExecution.idempotency_key,
                    )
                    .where(
                        WorkflowExecution.workspace_id == claim.workspace_id,
                        WorkflowExecution.parent_execution_id == claim.id,
                        WorkflowExecution.idempotency_key.startswith(base),
                    )
                    .order_by(WorkflowExecution.created_at.desc())
                    .limit(1)
                )
            ).one_or_none()
            attempt = 0
            if latest is not None:
                attempt = int(str(latest.idempotency_key).rsplit("#", 1)[1])
                if latest.status in (E.FAILED, E.CANCELLED) and self._retrying(ctx):
                    attempt += 1
            key = f"{base}{attempt}"
            child_id = await uow.session.scalar(
                insert(WorkflowExecution)
                .values(
                    id=uuid.uuid4(),
                    workspace_id=claim.workspace_id,
                    workflow_id=workflow.id,
                    version=workflow.current_version,
                    status=E.PENDING,
                    trigger_type="sub_workflow",
                    trigger_data=trigger_data,
                    idempotency_key=key,
                    parent_execution_id=claim.id,
                    parent_node_id=node_id,
                    depth=depth,
                )
                .on_conflict_do_nothing(constraint=IDEMPOTENCY_KEY)
                .returning(WorkflowExecution.id)
            )
            if child_id is None:
                child_id = await uow.session.scalar(
                    select(WorkflowExecution.id).where(
                        WorkflowExecution.workspace_id == claim.workspace_id,
                        WorkflowExecution.idempotency_key == key,
                    )
                )
        assert child_id is not None
        if not wait:
            self.enqueue(child_id, 0.0)
            return SubRun(child_id, E.PENDING)
        try:
            while True:
                async with self.sessionmaker() as session:
                    child = await session.get(WorkflowExecution, child_id)
                    assert child is not None
                if child.status in TERMINAL_EXECUTION:
                    ctx.usage[0] += child.input_tokens
                    ctx.usage[1] += child.output_tokens
                    ctx.usage[2] += child.cost_usd
                    return SubRun(child.id, child.status, child.output, child.error)
                # Claims nothing while another worker holds it or a retry wait parks
                # it; then look again shortly.
                if await self.execute(child_id) == "not_claimed":
                    await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            # Cancelled with the parent, at its deadline or at the node's timeout; a
            # parent that lost its lease or broke leaves the child to finish, and finds
            # it again when it resumes.
            if claim.stop not in ("lost", "abandoned"):
                await asyncio.shield(self._cancel_child(child_id))
            raise

    @staticmethod
    def _retrying(ctx: NodeContext) -> bool:
        """A node attempt after the first: its earlier child ended badly, start anew."""
        return ctx.attempt > 1

    async def _cancel_child(self, child_id: uuid.UUID) -> None:
        """The parent stopped (cancelled, or its run ended): so does the child, now if
        no worker holds it, otherwise by its worker at its next look."""
        async with UnitOfWork(self.sessionmaker) as uow:
            child = await uow.session.get(
                WorkflowExecution, child_id, with_for_update=True, populate_existing=True
            )
            if child is not None and child.status not in TERMINAL_EXECUTION:
                await cancel_tree(uow, child, _now())

    async def _body_step(
        self,
        claim: Claim,
        body: ValidGraph,
        parent: str,
        node_id: str,
        iteration: int,
        scope: dict[str, Any],
    ) -> NodeResult:
        """One body node for one item. Short retry waits happen here; a failure (or a
        long wait) goes up to the for_each node, whose own policy retries or parks it."""
        node, config = body.nodes[node_id], body.configs[node_id]
        ctx = NodeContext(
            node=node,
            config=config,
            execution_id=claim.id,
            workspace_id=claim.workspace_id,
            settings=self.settings,
            scope=scope,
            http=self.http,
            sessionmaker=self.sessionmaker,
        )
        key = f"{parent}.{node_id}"
        ctx.emit = functools.partial(self._node_emit, claim, key)
        attempt = 0
        while True:
            attempt += 1
            started = _now()
            try:
                async with asyncio.timeout(self._node_timeout(claim, body, node.timeout_s)):
                    result = await HANDLERS[node.type](ctx)
                size = self._check_size(result)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failure = classify(exc)
                delay = retry_delay(
                    failure,
                    attempt=attempt,
                    max_retries=node.retry.max_retries,
                    backoff_s=node.retry.backoff_s,
                    retry_on=list(node.retry.on),
                    max_countdown_s=self.settings.celery.max_countdown_s,
                )
                if delay is not None and delay <= self.settings.engine.inline_retry_max_s:
                    await asyncio.sleep(delay)
                    continue
                error = {
                    "message": failure.message,
                    "class": failure.error_class,
                    "attempt": attempt,
                }
                await self._checkpoint(
                    claim,
                    key,
                    {
                        "status": N.FAILED,
                        "attempt": attempt,
                        "error": error,
                        "started_at": started,
                        "finished_at": _now(),
                    },
                    iteration,
                )
                raise NodeFailure(
                    f"{node_id} (item {iteration - 1}): {failure.message}",
                    failure.error_class,
                    delay,
                ) from exc
            await self._checkpoint(
                claim,
                key,
                {
                    "status": N.COMPLETED,
                    "branch": result.branch,
                    "attempt": attempt,
                    "output": result.output,
                    "started_at": started,
                    "finished_at": _now(),
                    "input_tokens": result.input_tokens,
                    "output_tokens": result.output_tokens,
                    "cost_usd": result.cost_usd,
                },
                iteration,
                size,
            )
            return result

    def _node_timeout(self, claim: Claim, graph: ValidGraph, node_timeout: float | None) -> float:
        """A node never outlives its run's deadline, nor Celery's soft limit for this
        delivery (a hard-limit kill would restart the node from scratch)."""
        left_in_run = (
            claim.started_at + timedelta(seconds=graph.settings.timeout_s) - _now()
        ).total_seconds()
        left_in_task = (
            self.settings.celery.task_soft_time_limit_s - 30 - (time.monotonic() - claim.claimed_at)
        )
        return max(0.1, min(node_timeout or graph.settings.timeout_s, left_in_run, left_in_task))

    def _check_size(self, result: NodeResult) -> int:
        size = len(json.dumps(result.output, default=str))
        if size > self.settings.engine.max_output_bytes:
            raise NodeFailure(
                f"output is {size} bytes, over the {self.settings.engine.max_output_bytes} limit",
                "permanent",
            )
        return size

    async def _park(self, claim: Claim, run: RunState, at: datetime) -> None:
        """Release the worker slot until `at`: back to pending, re-enqueued with a countdown."""
        async with UnitOfWork(self.sessionmaker) as uow:
            ex = await uow.session.get(
                WorkflowExecution, claim.id, with_for_update=True, populate_existing=True
            )
            if ex is None or ex.status != E.RUNNING or ex.lease_owner != claim.token:
                return
            transition("execution", ex.status, E.PENDING, at=_now(), reason="retry wait")
            ex.status = E.PENDING
            ex.resume_at = at
            ex.lease_owner = None
            ex.lease_expires_at = None
            # A parked run is not a failed delivery: the next claim is expected.
            ex.deliveries = max(0, ex.deliveries - 1)
            countdown = max(0.0, (at - _now()).total_seconds())
            await self.events.drain(claim.id)
            publish_after_commit(uow, ex)
            uow.after_commit(lambda: self.enqueue(claim.id, countdown))

    async def _close(
        self, claim: Claim, status: ExecutionStatus, *, run: RunState | None = None, **values: Any
    ) -> None:
        # Every node event goes out before the run's last one.
        await self.events.drain(claim.id)
        now = _now()
        transition("execution", E.RUNNING, status, at=now)

        def total(column: Any, empty: Any) -> Any:
            return (
                select(func.coalesce(func.sum(column), empty))
                .where(NodeExecution.execution_id == claim.id)
                .scalar_subquery()
            )

        async with UnitOfWork(self.sessionmaker) as uow:
            if status == E.CANCELLED:
                # Nodes that never started are cancelled too, so the picture is whole.
                await uow.session.execute(
                    update(NodeExecution)
                    .where(
                        NodeExecution.execution_id == claim.id,
                        NodeExecution.status == N.RETRYING,
                        exists(_LEASED.params(execution_id=claim.id, lease=claim.token)),
                    )
                    .values(status=N.CANCELLED)
                )
            # One statement: only the lease holder of a running run closes it (a worker
            # that lost the lease changes nothing), totals summed in the same go.
            ex = (
                await uow.session.scalars(
                    update(WorkflowExecution)
                    .where(
                        WorkflowExecution.id == claim.id,
                        WorkflowExecution.lease_owner == claim.token,
                        WorkflowExecution.status == E.RUNNING,
                    )
                    .values(
                        status=status,
                        finished_at=now,
                        duration_ms=round((now - claim.started_at).total_seconds() * 1000, 3),
                        lease_owner=None,
                        lease_expires_at=None,
                        input_tokens=total(NodeExecution.input_tokens, 0),
                        output_tokens=total(NodeExecution.output_tokens, 0),
                        cost_usd=total(NodeExecution.cost_usd, 0.0),
                        **values,
                    )
                    .returning(WorkflowExecution),
                    execution_options={"populate_existing": True},
                )
            ).one_or_none()
            if ex is None:
                return
            publish_after_commit(uow, ex)
            await execution_finished(uow, ex)
        log.info("execution.finished", execution_id=str(claim.id), status=str(status))
