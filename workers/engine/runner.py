"""The runner: claims an execution and schedules its DAG, node by node.

One event loop per worker process carries many runs at once (their work is I/O-bound).
For each run, nodes of a generation run concurrently, each node's result is committed the
moment it finishes (one fenced upsert), so a worker that dies loses at most the nodes in
flight; a resumed run starts from its checkpoints and completed nodes never run again.

Everything else has a module of its own: the lifecycle (backend/executions/lifecycle.py)
makes every status change; checkpoints.py writes node states; attempt.py runs one node
attempt after attempt; loops.py and subruns.py run loop bodies and child runs; lease.py
is the process's heartbeat (renewals and cancel requests); progress.py the events. What
stays here is deciding what runs next and how the run ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import backend.inbox  # (registers the run-finished listeners)
import backend.triggers  # noqa: F401
from backend.config import Settings
from backend.executions import lifecycle
from backend.executions.lifecycle import Claim, LeaseLost
from backend.executions.state import ExecutionStatus, NodeStatus
from backend.inbox import links
from backend.kit.logging import get_logger
from backend.workflows.graph import (
    ApprovalLogic,
    ForEachLogic,
    GraphInvalid,
    Node,
    SubWorkflowIntegration,
    ValidGraph,
    WaitLogic,
    WhileLogic,
)
from workers.engine import checkpoints
from workers.engine.attempt import attempt_node, node_time_limit
from workers.engine.checkpoints import Checkpoints, RunState, now
from workers.engine.dag import (
    NodeState,
    failed_nodes,
    is_finished,
    merge_any_nodes,
    skip_closure,
)
from workers.engine.graphs import pinned_graph
from workers.engine.lease import Heartbeat, Held
from workers.engine.loops import Loops
from workers.engine.progress import Progress
from workers.engine.subruns import SubRuns
from workers.nodes import HANDLERS
from workers.nodes.base import NodeContext

log = get_logger(__name__)
E, N = ExecutionStatus, NodeStatus
Enqueue = Callable[[uuid.UUID, float], None]


@dataclass
class Run:
    """One run this process holds, while it holds it."""

    claim: Claim
    graph: ValidGraph
    state: RunState
    held: Held
    # When the run started, moved on by the time it spent parked on approvals and
    # waits: its deadline and every node's time limit count from here.
    started: datetime
    deadline: datetime
    # `vars` as the completed `set` nodes left them.
    variables: dict[str, Any]
    running: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    # The one-time resume URLs of the run's `wait` steps (templates upstream of them
    # hand them out as `execution.resume_urls.<node id>`).
    resume_urls: dict[str, str] = field(default_factory=dict)


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
        self.progress = Progress()
        self.checkpoints = Checkpoints(sessionmaker, self.progress)
        self.heartbeat = Heartbeat(settings, sessionmaker)
        self.subruns = SubRuns(settings, sessionmaker, enqueue, self.execute)
        self.loops = Loops(settings, self.checkpoints, self.subruns, self._context)

    # Entry points -----------------------------------------------------------------------

    async def claim(self, execution_id: uuid.UUID) -> Claim | None:
        return await lifecycle.claim(
            self.sessionmaker, execution_id, worker_id=self.worker_id, settings=self.settings
        )

    async def execute(self, execution_id: uuid.UUID) -> str:
        """Claim the run and run it to its end (or until it parks); "not_claimed" when
        someone else holds it, it is parked, or it already ended."""
        claim = await self.claim(execution_id)
        if claim is None:
            return "not_claimed"
        return await self.run_claimed(claim)

    async def run_claimed(self, claim: Claim) -> str:
        held = self.heartbeat.hold(claim)
        try:
            return await self._run_claimed(claim, held)
        finally:
            self.heartbeat.let_go(claim)
            await self.progress.drain(claim)

    async def _run_claimed(self, claim: Claim, held: Held) -> str:
        self.progress.run_started(claim)
        try:
            graph = await pinned_graph(self.sessionmaker, claim)
        except GraphInvalid as exc:
            problems = [p.as_dict() for p in exc.problems]
            message = "the pinned version no longer validates"
            await self._close(claim, E.FAILED, error={"message": message, "problems": problems})
            return E.FAILED
        state = RunState() if claim.fresh else await checkpoints.load(self.sessionmaker, claim.id)
        started = claim.started_at + timedelta(seconds=checkpoints.waited_s(graph, state))
        run = Run(
            claim=claim,
            graph=graph,
            state=state,
            held=held,
            started=started,
            deadline=started + timedelta(seconds=graph.settings.timeout_s),
            variables=checkpoints.variables_of(claim.variables, graph, state),
            resume_urls={
                n: links.resume_url(self.settings, claim.id, n, 0)
                for n, cfg in graph.configs.items()
                if isinstance(cfg, WaitLogic) and cfg.resume_url
            },
        )
        try:
            return await self._schedule(run)
        except LeaseLost:
            log.warning("execution.lease_lost", execution_id=str(claim.id))
            return "lost_lease"
        except BaseException:
            # Something unexpected (a database outage, a worker shutting down): hand
            # the run back at once rather than after the lease runs out.
            with contextlib.suppress(Exception):
                await lifecycle.release(self.sessionmaker, claim)
            raise
        finally:
            # However the run ended, no node task outlives it: a stray task would write
            # later, and the loop carries other runs.
            leftover = [t for t in run.running.values() if not t.done()]
            if leftover:
                claim.stop = claim.stop or "abandoned"
            for task in leftover:
                task.cancel()
            await asyncio.gather(*leftover, return_exceptions=True)

    # Scheduling -------------------------------------------------------------------------

    async def _schedule(self, run: Run) -> str:
        """Start every node that is ready, wait for one to finish (or for a cancel, or
        the deadline), and again, until nothing can run; then end the run."""
        claim, graph, state, running = run.claim, run.graph, run.state, run.running
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
        cancel = run.held.cancel
        while not cancel.is_set():
            if now() > run.deadline:
                return await self._time_out(run)
            ready, settled = skip_closure(graph.graph, state.states, merge_any, start)
            skipped = [
                n for n, s in settled.items() if s.status == N.SKIPPED and state.states.get(n) != s
            ]
            await self.checkpoints.skip(claim, skipped, state)
            state.states.update(settled)
            at = now()
            due = [n for n, when in state.retry_at.items() if when <= at and n not in running]
            due += [n for n, when in state.waiting.items() if when <= at and n not in running]
            for node_id in [*ready, *due]:
                if node_id in running:
                    continue
                state.retry_at.pop(node_id, None)
                state.waiting.pop(node_id, None)
                state.states[node_id] = NodeState(N.RUNNING)
                running[node_id] = asyncio.create_task(self._run_node(run, node_id, limit))
            if failed_nodes(state.states, continue_on_error) and not running:
                break
            if not running:
                if state.retry_at or state.waiting:
                    await self._park(run, min([*state.retry_at.values(), *state.waiting.values()]))
                    return "parked"
                break
            await self._wait_for_any(run)
            if failed_nodes(state.states, continue_on_error):
                # Let siblings in flight finish their checkpoint, start nothing new.
                await asyncio.gather(*running.values(), return_exceptions=True)
                running.clear()
                break
        if cancel.is_set():
            await self._stop_nodes(run)
            if run.held.lost.is_set():
                # Someone else holds the run now (our lease lapsed): leave it to them.
                return "lost_lease"
            await self._close(claim, E.CANCELLED, error={"message": "cancelled"})
            return E.CANCELLED
        return await self._finish(run, continue_on_error)

    async def _wait_for_any(self, run: Run) -> None:
        """Until a node finishes, a cancel arrives or the run's deadline passes."""
        waiters: set[asyncio.Future[Any]] = set(run.running.values())
        cancel_wait = asyncio.ensure_future(run.held.cancel.wait())
        waiters.add(cancel_wait)
        remaining = max(0.0, (run.deadline - now()).total_seconds())
        await asyncio.wait(waiters, timeout=remaining + 0.01, return_when=asyncio.FIRST_COMPLETED)
        cancel_wait.cancel()
        for node_id, task in list(run.running.items()):
            if task.done():
                del run.running[node_id]
                with contextlib.suppress(asyncio.CancelledError):
                    task.result()

    async def _stop_nodes(self, run: Run) -> None:
        for task in run.running.values():
            task.cancel()
        await asyncio.gather(*run.running.values(), return_exceptions=True)
        run.running.clear()

    async def _time_out(self, run: Run) -> str:
        run.claim.stop = "deadline"
        await self._stop_nodes(run)
        timeout_s = run.graph.settings.timeout_s
        error = {"message": f"execution timed out after {timeout_s} s"}
        await self._close(run.claim, E.FAILED, error=error)
        return E.FAILED

    async def _finish(self, run: Run, continue_on_error: frozenset[str]) -> str:
        claim, graph, state = run.claim, run.graph, run.state
        fatal = failed_nodes(state.states, continue_on_error)
        if fatal:
            first = fatal[0]
            error = {"node_id": first, **state.errors.get(first, {})}
            await self._close(claim, E.FAILED, error=error)
            return E.FAILED
        if not is_finished(graph.graph, state.states):
            error = {"message": "the run stopped with nodes that can never run"}
            await self._close(claim, E.FAILED, error=error)
            return E.FAILED
        sinks = [
            n
            for n in graph.graph.nodes
            if graph.graph.out_degree(n) == 0 and state.states[n].status == N.COMPLETED
        ]
        output = {n: state.outputs.get(n) for n in sinks}
        await self._close(claim, E.COMPLETED, output=output, variables=run.variables)
        return E.COMPLETED

    # One node -----------------------------------------------------------------------------

    def _context(
        self,
        claim: Claim,
        node: Node,
        config: Any,
        scope: dict[str, Any],
        key: str,
        iteration: int = 0,
    ) -> NodeContext:
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
        ctx.key = key
        ctx.iteration = iteration
        ctx.emit = functools.partial(self.progress.node_line, claim, key)
        return ctx

    async def _run_node(self, run: Run, node_id: str, limit: asyncio.Semaphore) -> None:
        claim, graph, state = run.claim, run.graph, run.state
        node, config = graph.nodes[node_id], graph.configs[node_id]
        upstream = list(graph.graph.predecessors(node_id))
        scope = {
            "trigger": claim.trigger_data,
            "nodes": state.scope_nodes,
            "vars": run.variables,
            "execution": {
                "id": str(claim.id),
                "workflow_id": str(claim.workflow_id),
                "version": claim.version,
                "resume_urls": run.resume_urls,
            },
            "inputs": [p for p in upstream if state.status_of(p) == N.COMPLETED],
        }
        ctx = self._context(claim, node, config, scope, node_id)
        if isinstance(config, ApprovalLogic | WaitLogic):
            ctx.waiting_since = state.spans.get(node_id, (None, None))[0]
        time_limit = functools.partial(node_time_limit, run.started)
        if isinstance(config, ForEachLogic | WhileLogic):
            ctx.run_body = await self.loops.body_runner(
                claim, graph, node_id, config, scope, ctx, time_limit
            )
        elif isinstance(config, SubWorkflowIntegration):
            ctx.run_workflow = functools.partial(self.subruns.run, claim, node_id, 0, ctx)
        async with limit:
            started = now()

            def on_start(attempt: int) -> None:
                state.attempts[node_id] = attempt
                self.progress.node_started(claim, node_id, attempt)

            try:
                done = await attempt_node(
                    ctx,
                    HANDLERS[node.type],
                    policy=node.retry,
                    settings=self.settings,
                    time_limit=functools.partial(time_limit, graph, node.timeout_s),
                    first_attempt=state.attempts.get(node_id, 0) + 1,
                    on_start=on_start,
                )
            except asyncio.CancelledError:
                # With the lease gone this writes nothing, and must not: the new owner
                # runs the node again.
                with contextlib.suppress(LeaseLost):
                    values = {
                        "attempt": state.attempts.get(node_id, 1),
                        "started_at": started,
                        "finished_at": now(),
                    }
                    await self.checkpoints.write(claim, node_id, N.RUNNING, N.CANCELLED, values)
                state.states[node_id] = NodeState(N.CANCELLED)
                raise
        await self.checkpoints.outcome(claim, state, run.variables, node_id, node, config, done)

    # Ending -------------------------------------------------------------------------------

    async def _park(self, run: Run, at: datetime) -> None:
        """Release the worker slot until `at`: the run waits in the database, not here."""
        drain = functools.partial(self.progress.drain, run.claim)
        reason = "waiting" if run.state.waiting else "retry wait"
        await lifecycle.park(
            self.sessionmaker, run.claim, at, enqueue=self.enqueue, before_commit=drain,
            reason=reason,
        )  # fmt: skip

    async def _close(self, claim: Claim, status: ExecutionStatus, **values: Any) -> None:
        # Every node event goes out before the run's last one.
        await self.progress.drain(claim)
        await lifecycle.close(self.sessionmaker, claim, status, **values)
