"""The one owner of every status change of a run and of its nodes.

Each change here is the same four steps: `transition()` checks it against the state
machine's table, the repository writes it (fenced by the lease where a worker holds the
run), the run's history gets a row (from, to, reason, at, by), and events go out after
the commit. The API, the runner, the reaper and the trigger hooks all come here; nothing
else assigns a status (tests/executions/test_lifecycle.py greps for it).

What happens when a run ends beyond its own row (event triggers, notifications) is
registered with `on_finished`, so this module needs no import of those domains.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.executions import admission as admission_sql
from backend.executions import repository as repo
from backend.executions.state import TERMINAL_EXECUTION, ExecutionStatus, NodeStatus, transition
from backend.kit import db
from backend.kit.db import UnitOfWork
from backend.kit.logging import get_logger
from backend.kit.tasks import Send, send_in_thread
from backend.models import ExecutionTransition, WorkflowExecution
from backend.quotas import service as quotas
from backend.realtime.events import publish_after_commit

log = get_logger(__name__)
E, N = ExecutionStatus, NodeStatus
T = TypeVar("T")
EXECUTE_TASK = "workflow.execute"
EXECUTE_MANY_TASK = "workflow.execute_many"
REAPER = "reaper"
# A run parked on something with no deadline (an approval without expiry, a resume URL
# with no timeout) waits until woken: no message is sent for it, and the reaper's scan
# of due parked runs never reaches this.
FOREVER = datetime(9999, 1, 1, tzinfo=UTC)

# Finished listeners ------------------------------------------------------------------------

FinishedListener = Callable[[UnitOfWork, WorkflowExecution], Awaitable[None]]
_finished: list[FinishedListener] = []
# Facts a listener needs at every close, computed by the closing statement itself (an
# SQL expression over `closed`, the closed run's row) instead of a round trip of their
# own: name -> expression. The runner's close puts their values in
# `uow.session.info[CLOSE_FACTS][execution id]`; other ways a run ends (a cancel, the delivery cap)
# leave it out, and the listener asks the database as before.
_close_facts: dict[str, str] = {}
CLOSE_FACTS = "orch.close_facts"


def fact_at_close(name: str, expression: str) -> None:
    """Have the runner's closing statement also compute `expression` (trusted SQL from
    our own code, never user input) as the fact `name`."""
    if not name.isidentifier() or "%" in expression:
        # `%` would be read as one of the statement's parameters.
        raise ValueError(f"fact {name!r}: an identifier and an expression without '%'")
    _close_facts[name] = expression


def on_finished(listener: FinishedListener) -> FinishedListener:
    """Call `listener(uow, execution)` inside the transaction that moves a run to a
    terminal status, so whatever it writes commits (or rolls back) with that status."""
    if listener not in _finished:
        _finished.append(listener)
    return listener


async def _ended(uow: UnitOfWork, execution: WorkflowExecution) -> None:
    publish_after_commit(uow, execution)
    for listener in _finished:
        await listener(uow, execution)


def _now() -> datetime:
    return datetime.now(UTC)


# Creating runs -------------------------------------------------------------------------------


async def create_run(
    uow: UnitOfWork,
    *,
    workspace_id: uuid.UUID,
    workflow_id: uuid.UUID,
    version: int,
    trigger_type: str,
    trigger_data: dict[str, Any],
    actor: str | None,
    reason: str = "created",
    enqueue: bool = True,
    skip_duplicate: bool = False,
    activity: Mapping[str, Any] | None = None,
    **values: Any,
) -> WorkflowExecution | None:
    """Every run starts here (API, retry, rerun, schedules, webhooks, events, sub-runs):
    a `pending` row, its first history entry and, after the commit, its message;
    `activity` (activity.service.entry_values) is written in the same statement, as the
    run's activity entry, only if the run is. With
    `skip_duplicate`, None when a unique key (idempotency key, schedule slot) already
    has its run: the database decides, so two dispatchers can never both fire one.
    Quotas are checked first (backend/quotas): QuotaExceeded, or None for a schedule or
    event run skipped over a quota (recorded there; raising would undo an event's close)."""
    admission = await quotas.admit_runs(
        uow.session, workspace_id, 1, trigger_type=trigger_type, actor=actor, values=values
    )
    if admission is None:
        return None
    admission.hold_until_commit(uow)
    # The run and its first history row in one statement (backend/executions/admission.py).
    execution = await admission_sql.insert_run(
        uow.session,
        {
            "id": uuid.uuid4(),
            "workspace_id": workspace_id,
            "workflow_id": workflow_id,
            "version": version,
            "trigger_type": trigger_type,
            "trigger_data": trigger_data,
            "status": E.PENDING.value,
            **values,
        },
        skip_duplicate=skip_duplicate,
        status=E.PENDING.value,
        at=_now(),
        actor=actor,
        reason=reason,
        activity=activity,
    )
    if execution is None:
        await admission.release(1)
        return None
    if enqueue:
        _enqueue_after_commit(uow, execution.id)
    return execution


async def create_runs(
    uow: UnitOfWork,
    rows: Sequence[dict[str, Any]],
    *,
    actor: str | None,
    reason: str,
) -> list[uuid.UUID]:
    """Many runs in one go (POST /executions/batch): one multi-row insert, one for their
    history, and one publish of all their messages after the commit. Rows carry the
    columns of create_run; a row whose unique key already has its run is skipped (the
    caller finds those by key)."""
    now = _now()
    admission = quotas.FREE
    if rows:  # one batch is one workflow's runs from one caller: admitted together
        first = rows[0]
        found = await quotas.admit_runs(
            uow.session, first["workspace_id"], len(rows),
            trigger_type=first["trigger_type"], actor=actor, values=first,
        )  # fmt: skip
        admission = found or quotas.FREE
        if found is None:
            return []
        admission.hold_until_commit(uow)
    values = [{"id": uuid.uuid4(), "status": E.PENDING.value, **row} for row in rows]
    ids = await repo.insert_runs(uow.session, values)
    await admission.release(len(values) - len(ids))
    await repo.add_history(
        uow.session,
        [repo.history_row(i, None, E.PENDING, at=now, actor=actor, reason=reason) for i in ids],
    )
    if ids:
        uow.after_commit(functools.partial(_send_all, list(ids)))
    return ids


# Runs per `workflow.execute_many` message: the broker's cost is paid once per chunk,
# and chunks small enough spread a batch over every worker process.
RUNS_PER_MESSAGE = 10
# Under load (a message went out less than BUSY_WITHIN_S ago), the next one waits
# COALESCE_S for runs committed meanwhile before it goes: more runs share a publish
# (at ~250 starts a second per process one run came every ~4 ms, and most messages
# carried one run). A run started when nothing was sent lately goes at once.
BUSY_WITHIN_S = 0.02
COALESCE_S = 0.004


async def _send_all(ids: list[uuid.UUID]) -> None:
    # One thread hop for the whole batch, one message per chunk.
    await send_in_thread(
        *(
            Send(EXECUTE_MANY_TASK, [[str(i) for i in ids[first : first + RUNS_PER_MESSAGE]]])
            for first in range(0, len(ids), RUNS_PER_MESSAGE)
        )
    )


class _RunMessages:
    """The messages of the runs one event loop admits, sent as they come: a run alone
    goes as `workflow.execute`; runs committed while the previous message was being
    published go together as one `workflow.execute_many` (up to RUNS_PER_MESSAGE). Under
    load (many requests starting runs at once) the broker's cost per run, most of a
    start's CPU (kombu's publish and the `task-sent` event Flower reads), is paid once
    per message (and under load the next message waits COALESCE_S for company); a run
    started when nothing was sent lately waits for nothing. Each caller still waits
    until its run's message is out (the answer to a start means the message was
    published) and sees the publish's error; a failed publish leaves its runs to the
    reaper as before.

    A message carries its caller's context (request id header, trace parent) only when
    it carries that caller's run alone; one for several callers carries none: never
    one request's identity on another's runs."""

    def __init__(self) -> None:
        self.waiting: list[tuple[str, asyncio.Future[None], contextvars.Context]] = []
        self.draining: asyncio.Task[None] | None = None
        # When the last message went out (monotonic): under load, see COALESCE_S.
        self.last_sent = -math.inf

    async def send(self, execution_id: uuid.UUID) -> None:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((str(execution_id), future, contextvars.copy_context()))
        if self.draining is None:
            # A context of its own: the task outlives the request that started it.
            self.draining = asyncio.create_task(self._drain(), context=contextvars.Context())
        await future

    async def _drain(self) -> None:
        batch: list[tuple[str, asyncio.Future[None], contextvars.Context]] = []
        try:
            while self.waiting:
                if (
                    len(self.waiting) < RUNS_PER_MESSAGE
                    and time.monotonic() - self.last_sent < BUSY_WITHIN_S
                ):
                    # Under load, runs committed a moment later join this message.
                    await asyncio.sleep(COALESCE_S)
                batch = self.waiting[:RUNS_PER_MESSAGE]
                self.waiting = self.waiting[RUNS_PER_MESSAGE:]
                ids = [execution_id for execution_id, _, _ in batch]
                error: Exception | None = None
                try:
                    if len(batch) == 1:
                        await send_in_thread(Send(EXECUTE_TASK, ids), context=batch[0][2])
                    else:
                        await send_in_thread(
                            Send(EXECUTE_MANY_TASK, [ids]), context=contextvars.Context()
                        )
                except Exception as exc:
                    error = exc
                self.last_sent = time.monotonic()
                for _, future, _ in batch:
                    if future.done():  # its caller was cancelled; the run was sent anyway
                        continue
                    if error is None:
                        future.set_result(None)
                    else:
                        future.set_exception(_not_sent(error))
                batch = []
        except BaseException as exc:
            # The loop is going away: nobody may wait forever on a message not sent
            # (the reaper enqueues those runs).
            for _, future, _ in [*batch, *self.waiting]:
                if not future.done():
                    future.set_exception(_not_sent(exc))
            self.waiting = []
            raise
        finally:
            self.draining = None


def _not_sent(cause: BaseException) -> RuntimeError:
    """An error of each caller's own (one exception object raised in several tasks
    would collect all their tracebacks), naming the cause."""
    error = RuntimeError(f"run message not sent: {cause!r}")
    error.__cause__ = cause
    return error


_run_messages: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _RunMessages] = (
    weakref.WeakKeyDictionary()
)


async def _send_run(execution_id: uuid.UUID) -> None:
    loop = asyncio.get_running_loop()
    sender = _run_messages.get(loop)
    if sender is None:
        sender = _run_messages[loop] = _RunMessages()
    await sender.send(execution_id)


def _enqueue_after_commit(uow: UnitOfWork, execution_id: uuid.UUID) -> None:
    send = functools.partial(_send_run, execution_id)
    send.__name__ = f"enqueue:{EXECUTE_TASK}"  # type: ignore[attr-defined]
    uow.after_commit(send)


async def history(session: AsyncSession, execution_id: uuid.UUID) -> Sequence[ExecutionTransition]:
    return await repo.history(session, execution_id)


# Claiming ------------------------------------------------------------------------------------


class LeaseLost(Exception):
    """This worker no longer holds the run: another one does, or will."""


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


def _engine(sessionmaker: async_sessionmaker[AsyncSession]) -> AsyncEngine:
    bind = sessionmaker.kw["bind"]
    assert isinstance(bind, AsyncEngine)
    return bind


def _single_statements(engine: AsyncEngine) -> AsyncEngine:
    """The engine in autocommit: a statement that is atomic on its own (the claim, a
    checkpoint, a renewal) goes in one round trip instead of three (psycopg sends BEGIN
    and COMMIT as round trips of their own); measured, this was most of a run's cost.
    Workers give it a pool of its own (db.use_autocommit_engine)."""
    return db.autocommit(engine)


async def _on_fresh_connection(engine: AsyncEngine, work: Callable[[Any], Awaitable[Any]]) -> Any:
    """One autocommit statement, sent once more if its pooled connection was dead."""

    async def once() -> Any:
        async with _single_statements(engine).connect() as conn:
            return await work(conn)

    return await _once_more_on_a_dropped_connection(once)


async def claim(
    sessionmaker: async_sessionmaker[AsyncSession],
    execution_id: uuid.UUID,
    *,
    worker_id: str,
    settings: Settings,
) -> Claim | None:
    """Take the run under a lease: the common case in one statement; anything else the
    slow way, which says why it cannot be claimed (or ends the run)."""
    now = _now()
    engine_settings = settings.engine
    token = f"{worker_id}/{uuid.uuid4().hex[:12]}"
    params = {
        "execution_id": execution_id,
        "to_status": E.RUNNING.value,
        "now": now,
        "token": token,
        "lease_until": now + timedelta(seconds=engine_settings.lease_s),
        "max_deliveries": engine_settings.max_deliveries,
    }
    row = await _on_fresh_connection(_engine(sessionmaker), lambda conn: repo.claim(conn, params))
    if row is not None:
        if row.from_status != E.RUNNING:
            transition("execution", row.from_status, E.RUNNING, at=now)
        # started_at was empty until now: never ran, so nothing was checkpointed.
        return Claim.of(row, token, fresh=row.started_at == now and row.retry_of is None)
    return await _claim_slow(sessionmaker, execution_id, token, settings)


async def _claim_slow(
    sessionmaker: async_sessionmaker[AsyncSession],
    execution_id: uuid.UUID,
    token: str,
    settings: Settings,
) -> Claim | None:
    now = _now()
    limit = settings.engine.max_deliveries
    async with UnitOfWork(sessionmaker) as uow:
        ex = await repo.lock_run(uow.session, execution_id)
        if ex is None or ex.status in TERMINAL_EXECUTION:
            return None
        if ex.lease_owner and ex.lease_expires_at and ex.lease_expires_at > now:
            log.info("execution.lease_held", execution_id=str(execution_id), owner=ex.lease_owner)
            return None
        if ex.resume_at and ex.resume_at > now:
            return None
        if ex.cancel_requested_at is not None:
            await finish_unheld(
                uow, ex, E.CANCELLED, now=now, actor=token, reason="cancelled before it ran",
                error={"message": "cancelled before it ran"},
            )  # fmt: skip
            return None
        ex.deliveries += 1
        if ex.deliveries > limit:
            message = f"gave up after {limit} deliveries"
            await finish_unheld(
                uow, ex, E.FAILED, now=now, actor=token, reason=message,
                error={"message": message},
            )  # fmt: skip
            return None
        await _set_run_status(uow, ex, E.RUNNING, now=now, actor=token, reason="claimed")
        ex.started_at = ex.started_at or now
        ex.lease_owner = token
        ex.lease_expires_at = now + timedelta(seconds=settings.engine.lease_s)
        ex.resume_at = None
        return Claim.of(ex, token)


async def _set_run_status(
    uow: UnitOfWork,
    ex: WorkflowExecution,
    to: ExecutionStatus,
    *,
    now: datetime,
    actor: str | None,
    reason: str | None,
) -> None:
    """A locked run row to `to`, checked and recorded (the caller commits)."""
    old = ex.status
    if old == to:
        return
    transition("execution", old, to, at=now, reason=reason)
    ex.status = to
    await repo.add_history(
        uow.session, [repo.history_row(ex.id, old, to, at=now, actor=actor, reason=reason)]
    )


async def finish_unheld(
    uow: UnitOfWork,
    ex: WorkflowExecution,
    to: ExecutionStatus,
    *,
    now: datetime,
    actor: str | None,
    reason: str,
    **values: Any,
) -> None:
    """End a run no worker holds (a locked row): cancelled before it ran, the delivery
    cap, a cancel of a pending or abandoned run. Retry waits end with it."""
    await _set_run_status(uow, ex, to, now=now, actor=actor, reason=reason)
    ex.finished_at = now
    if ex.started_at is not None:
        ex.duration_ms = round((now - ex.started_at).total_seconds() * 1000, 3)
    ex.lease_owner = None
    ex.lease_expires_at = None
    for key, value in values.items():
        setattr(ex, key, value)
    if to == E.CANCELLED:
        await _cancel_waiting_nodes(uow, ex.id, now=now, actor=actor)
    await uow.session.flush()
    await _ended(uow, ex)


async def _cancel_waiting_nodes(
    uow: UnitOfWork, execution_id: uuid.UUID, *, now: datetime, actor: str | None
) -> None:
    transition("node", N.RETRYING, N.CANCELLED, at=now)
    transition("node", N.WAITING, N.CANCELLED, at=now)
    await repo.end_retrying(uow.session, execution_id, N.CANCELLED, "run cancelled", actor=actor)


# Nodes ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeChange:
    """One node's new state: `to` from `old` (None: it had no row yet), with the
    checkpoint's columns (CHECKPOINT_DEFAULTS)."""

    node_id: str
    old: str | None
    to: NodeStatus
    values: dict[str, Any]
    iteration: int = 0
    reason: str | None = None


async def record_nodes(
    sessionmaker: async_sessionmaker[AsyncSession], claim: Claim, changes: Sequence[NodeChange]
) -> None:
    """Checkpoint node states, fenced by the claim's lease, with their history, in one
    statement; raises LeaseLost when the lease is gone (nothing was written)."""
    now = _now()
    params = []
    for change in changes:
        if change.old != change.to:
            transition("node", change.old or N.PENDING, change.to, at=now)
        params.append(
            {
                **repo.CHECKPOINT_DEFAULTS,
                **change.values,
                "status": change.to.value,
                "id": uuid.uuid4(),
                "execution_id": claim.id,
                "node_id": change.node_id,
                "iteration": change.iteration,
                "lease": claim.token,
                "from_status": change.old,
                "reason": change.reason,
            }
        )
    if not params:
        return
    written = await _on_fresh_connection(
        _engine(sessionmaker), lambda conn: repo.write_checkpoints(conn, params)
    )
    if written == 0:
        # Nothing written: the lease is gone, or (a statement sent again after its
        # connection dropped) the first send had landed and the node is already in that
        # finished state. Only the first is a lost lease.
        holds = await _on_fresh_connection(
            _engine(sessionmaker), lambda conn: repo.holds_lease(conn, claim.id, claim.token)
        )
        if not holds:
            raise LeaseLost(
                f"lost the lease on {claim.id} before checkpointing {changes[0].node_id}"
            )


# Holding a run -------------------------------------------------------------------------------


async def renew(
    sessionmaker: async_sessionmaker[AsyncSession],
    claims: Sequence[Claim],
    lease_s: float,
) -> set[uuid.UUID]:
    """Renew the leases of every run a process holds in one statement (its heartbeat);
    the runs whose lease it still holds."""
    if not claims:
        return set()
    until = _now() + timedelta(seconds=lease_s)
    ids = [c.id for c in claims]
    tokens = [c.token for c in claims]
    held = await _on_fresh_connection(
        _engine(sessionmaker), lambda conn: repo.renew_leases(conn, ids, tokens, until)
    )
    return set(held)


async def look(
    sessionmaker: async_sessionmaker[AsyncSession], claims: Sequence[Claim]
) -> tuple[set[uuid.UUID], set[uuid.UUID]]:
    """(runs whose lease this process lost, runs someone asked to cancel) in one query."""
    if not claims:
        return set(), set()
    tokens = {c.id: c.token for c in claims}
    rows = await _on_fresh_connection(
        _engine(sessionmaker), lambda conn: repo.look(conn, list(tokens))
    )
    seen = {r.id: r for r in rows}
    lost = {i for i, token in tokens.items() if i not in seen or seen[i].lease_owner != token}
    cancel = {i for i, r in seen.items() if r.cancel_requested_at is not None}
    return lost, cancel


async def release(sessionmaker: async_sessionmaker[AsyncSession], claim: Claim) -> None:
    """Hand the run back at once (its lease lapses now, so the reaper or a redelivery
    takes it) rather than after the lease runs out; its checkpoints make that safe."""

    async def expire(conn: Any) -> None:
        await repo.release_lease(conn, claim.id, claim.token)

    await _on_fresh_connection(_engine(sessionmaker), expire)


async def park(
    sessionmaker: async_sessionmaker[AsyncSession],
    claim: Claim,
    at: datetime,
    *,
    enqueue: Callable[[uuid.UUID, float], None],
    before_commit: Callable[[], Awaitable[None]] | None = None,
    reason: str = "retry wait",
) -> bool:
    """Release the worker slot until `at` (FOREVER: until woken): back to pending,
    re-enqueued with a countdown. A `wake` that came while the run was held (a task
    decided, a resume URL called) parks it until now instead, so no wake-up is lost.
    False when this claim no longer holds the run."""
    now = _now()
    async with UnitOfWork(sessionmaker) as uow:
        ex = await repo.lock_run(uow.session, claim.id)
        if ex is None or ex.status != E.RUNNING or ex.lease_owner != claim.token:
            return False
        # The claim cleared resume_at: set while held, it is a wake-up's time.
        if ex.resume_at is not None and ex.resume_at < at:
            at, reason = ex.resume_at, "woken while running"
        await _set_run_status(uow, ex, E.PENDING, now=now, actor=claim.token, reason=reason)
        ex.resume_at = at
        ex.lease_owner = None
        ex.lease_expires_at = None
        # A parked run is not a failed delivery: the next claim is expected.
        ex.deliveries = max(0, ex.deliveries - 1)
        countdown = max(0.0, (at - now).total_seconds())
        if before_commit is not None:
            await before_commit()
        publish_after_commit(uow, ex)
        if at != FOREVER:
            uow.after_commit(lambda: enqueue(claim.id, countdown))
    return True


async def wake(uow: UnitOfWork, execution_id: uuid.UUID, *, actor: str | None, reason: str) -> bool:
    """Something a parked node waits for happened (a task decided, a resume URL called,
    an expiry): the run goes on now. A parked run is due at once and its message goes
    after the commit; a run a worker holds is marked, so its park comes straight back
    (see `park`). No status changes here: the node's own handler reads what happened
    when the run resumes. False when the run has ended."""
    now = _now()
    ex = await repo.lock_run(uow.session, execution_id)
    if ex is None or ex.status in TERMINAL_EXECUTION:
        return False
    ex.resume_at = now
    if ex.status == E.PENDING:
        # Logged once it holds: a caller may still refuse and roll back (a resume URL
        # already spent answers 409 after this).
        uow.after_commit(
            lambda: log.info(
                "execution.woken", execution_id=str(execution_id), actor=actor, reason=reason
            )
        )
        _enqueue_after_commit(uow, execution_id)
    return True


async def close(
    sessionmaker: async_sessionmaker[AsyncSession],
    claim: Claim,
    to: ExecutionStatus,
    *,
    reason: str | None = None,
    output: Any = None,
    error: Any = None,
    variables: Any = None,
) -> WorkflowExecution | None:
    """End a run this claim holds: one fenced statement (a worker that lost the lease
    changes nothing) that sums the totals and writes the history row; the finished
    listeners in the same transaction, the terminal event after its commit."""
    now = _now()
    transition("execution", E.RUNNING, to, at=now, reason=reason)
    duration_ms = round((now - claim.started_at).total_seconds() * 1000, 3)

    async def attempt() -> WorkflowExecution | None:
        async with UnitOfWork(sessionmaker) as uow:
            if to != E.COMPLETED:
                # Nodes waiting for a retry, a person or a time end with the run (a
                # cancel, a timeout), so nothing stays `retrying`/`waiting` forever.
                transition("node", N.RETRYING, N.CANCELLED, at=now)
                transition("node", N.WAITING, N.CANCELLED, at=now)
                await repo.end_retrying(
                    uow.session, claim.id, N.CANCELLED, f"run {to}",
                    actor=claim.token, fence=claim.token,
                )  # fmt: skip
            ex, facts = await repo.close_fenced(
                uow.session, claim.id, claim.token, to, now=now, duration_ms=duration_ms,
                reason=reason, output=output, error=error, variables=variables,
                facts=_close_facts,
            )  # fmt: skip
            if ex is not None:
                uow.session.info.setdefault(CLOSE_FACTS, {})[ex.id] = facts
                await _ended(uow, ex)
            return ex

    ex = await _once_more_on_a_dropped_connection(attempt)
    if ex is not None:
        log.info("execution.finished", execution_id=str(claim.id), status=str(to))
    return ex


async def _once_more_on_a_dropped_connection(work: Callable[[], Awaitable[T]]) -> T:
    """A transaction whose pooled connection PostgreSQL dropped (a restart: every pooled
    connection is dead at once, and workers skip the pre-ping) rolled back whole; it goes
    again on a fresh connection instead of handing the run to the reaper."""
    try:
        return await work()
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        return await work()


# Cancelling ----------------------------------------------------------------------------------


async def cancel_tree(
    uow: UnitOfWork, execution: WorkflowExecution, now: datetime, *, actor: str | None
) -> None:
    """Ask a run and every unfinished sub-run under it to stop. Runs nobody is running
    (pending, or whose worker let go) are cancelled here and now; a running one is
    cancelled by its worker, which looks several times a second."""
    children = await repo.unfinished_descendants(uow.session, execution.id)
    for run in [execution, *children]:
        run.cancel_requested_at = run.cancel_requested_at or now
        live_lease = run.lease_owner is not None and (
            run.lease_expires_at is None or run.lease_expires_at > now
        )
        if run.status == E.PENDING or not live_lease:
            await finish_unheld(
                uow, run, E.CANCELLED, now=now, actor=actor, reason="cancelled",
                error=run.error or {"message": "cancelled"},
            )  # fmt: skip
    await uow.session.flush()


async def cancel_child(
    sessionmaker: async_sessionmaker[AsyncSession], child_id: uuid.UUID, *, actor: str
) -> None:
    """A parent stopped (cancelled, or its run ended): so does its child, now if no
    worker holds it, otherwise by its worker at its next look."""
    async with UnitOfWork(sessionmaker) as uow:
        child = await repo.lock_run(uow.session, child_id)
        if child is not None and child.status not in TERMINAL_EXECUTION:
            await cancel_tree(uow, child, _now(), actor=actor)


# Reaping -------------------------------------------------------------------------------------


async def reap(
    sessionmaker: async_sessionmaker[AsyncSession], settings: Settings
) -> tuple[list[uuid.UUID], int]:
    """Nothing stays running or pending forever: a run whose lease lapsed goes back to
    pending (its checkpoints make a resume safe); a pending run nobody claimed within
    the grace period is handed on again (its message was lost), at most once per grace
    period. Returns (runs to enqueue, how many of them were lost messages). Times are
    the database's, so workers' clocks never decide whose lease lapsed."""
    grace = timedelta(seconds=settings.engine.pending_grace_s)
    requeue: list[uuid.UUID] = []
    async with UnitOfWork(sessionmaker) as uow:
        now = await repo.database_now(uow.session)
        for ex in await repo.expired_leases(uow.session, now):
            await _set_run_status(
                uow,
                ex,
                E.PENDING,
                now=now,
                actor=REAPER,
                reason=f"lease of {ex.lease_owner} expired",
            )
            ex.lease_owner = None
            ex.lease_expires_at = None
            publish_after_commit(uow, ex)
            requeue.append(ex.id)
        lost = await repo.unclaimed_pending(uow.session, now, now - grace)
        for ex in lost:
            # Touched, so the next pass leaves it alone for another grace period.
            ex.updated_at = now
            requeue.append(ex.id)
    return requeue, len(lost)
