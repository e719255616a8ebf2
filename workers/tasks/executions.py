"""Execution tasks: `workflow.execute` starts a run; `executions.reap` finds runs whose
worker died or whose message was lost, and hands them on; `executions.archive_events`
copies finished runs' event logs to PostgreSQL.

Each worker process keeps one event loop in a thread of its own and carries many runs on
it at once (their work is I/O-bound): `workflow.execute` claims its run, hands it to the
loop and returns, so the process takes the next message while earlier runs go on, up to
ENGINE__RUNS_PER_PROCESS at a time. The message is acknowledged once the run is claimed:
from then on the run's lease (renewed by the process's heartbeat) and the reaper are what
hand it on if the process dies, as they always did for a lease-holding run. A claim that
fails on the database is retried on a fresh connection and, failing that, the message
goes back to the queue (`retry`): nothing that could not start is acknowledged away.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

from celery import Task, signals
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from backend.config import get_settings
from backend.executions import lifecycle
from backend.kit.celery_app import celery_app
from backend.kit.db import create_engine, create_sessionmaker, use_autocommit_engine
from backend.kit.http_guard import guarded_client
from backend.kit.logging import get_logger
from backend.kit.tasks import Send, send_from_loop
from backend.realtime.events import event_log
from workers.engine.runner import Runner

log = get_logger(__name__)
EXECUTE = "workflow.execute"
EXECUTE_MANY = "workflow.execute_many"
T = TypeVar("T")


class _Process:
    """Per worker process: one event loop (in its own thread), one database pool, one
    HTTP client and one runner, kept across tasks (async connections belong to the loop
    that opened them)."""

    def __init__(self) -> None:
        settings = get_settings()
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="engine", daemon=True)
        self.thread.start()
        # No pre-ping on the worker's hot path: the lifecycle retries a statement whose
        # connection turned out dead instead (and the pool then pings, once, every
        # connection older than the drop: db.driver_cursor).
        hot = settings.db.model_copy(
            update={
                "pool_pre_ping": False,
                "pool_size": settings.db.pool_size + settings.db.max_overflow,
                "max_overflow": 0,
            }
        )
        # The hot path's single statements (claims, checkpoints, lease renewals) on a
        # pool of connections that are always in autocommit: sharing the ORM's pool, each
        # checkout switched autocommit on and back off again (measured: 10.0 -> 8.4 ms of
        # worker CPU per 3-node run). Every connection it may open stays pooled (no
        # overflow): a burst of checkpoints (40 parallel nodes) otherwise opened and
        # closed overflow connections, a new PostgreSQL backend each time (measured:
        # fanout40 118-151 ms with 10 + 10 overflow, 92 ms with 20).
        self.single = create_engine(settings.model_copy(update={"db": hot}), autocommit=True)
        # What is left for the ORM (closes, parks, loads, the reaper) is light: half as
        # many, so a process holds at most 1.5x (DB__POOL_SIZE + DB__MAX_OVERFLOW).
        orm = hot.model_copy(update={"pool_size": max(2, hot.pool_size // 2)})
        self.engine = create_engine(settings.model_copy(update={"db": orm}))
        use_autocommit_engine(self.engine, self.single)
        self.sessionmaker = create_sessionmaker(self.engine)
        self.http = guarded_client(
            settings.http.allow_private_networks, user_agent=settings.http.user_agent
        )
        self.runner = Runner(
            settings, self.sessionmaker, self.http, f"{socket.gethostname()}:{os.getpid()}", enqueue
        )
        self.slots = threading.BoundedSemaphore(settings.engine.runs_per_process)
        # Every worker process reaps on its own loop from its first task on: a dead
        # worker's runs are handed on even while beat is down or the `default` queue is
        # backed up (a database outage holds task slots in claim retries; a beat-sent
        # reap can sit behind them or go to the worker being killed), at one SKIP LOCKED
        # query per process per reaper interval.
        self.reaping: asyncio.Task[None] | None = None
        self.loop.call_soon_threadsafe(self._start_reaping)
        # The runs on the loop, as its own tasks (touched on the loop thread only), so a
        # shutdown can cancel them there and wait for them to hand their leases back.
        self.runs: set[asyncio.Task[str]] = set()

    async def _reap_forever(self) -> None:
        interval = self.settings.engine.reaper_interval_s
        while True:
            await asyncio.sleep(interval)
            started = time.monotonic()
            try:
                requeue, _ = await lifecycle.reap(self.sessionmaker, self.settings)
            except Exception as exc:
                log.warning("executions.reap_failed", error=str(exc))
                continue
            # Every pass, at debug: a reaper that stalls shows as a gap (LOG_LEVEL=DEBUG).
            log.debug("executions.reap_pass", found=len(requeue),
                      took_ms=round((time.monotonic() - started) * 1000, 1))  # fmt: skip
            taken = 0
            for execution_id in requeue:
                taken += await self._take_over(execution_id)
            if requeue:
                log.warning("executions.reaped", count=len(requeue), taken=taken, by="worker")

    async def _take_over(self, execution_id: uuid.UUID) -> bool:
        """Run a reaped run here, now, if this process has a free slot: no message to
        lose (one reserved by the dying worker comes back only after the visibility
        timeout, and the reaper would send another only after the pending grace). With
        no slot free, or a claim that fails, the run goes through the queue."""
        if not self.slots.acquire(blocking=False):
            enqueue(execution_id)
            return False
        try:
            claim = await self.runner.claim(execution_id)
        except Exception:
            self.slots.release()
            enqueue(execution_id)
            return False
        if claim is None:  # someone else took it first
            self.slots.release()
            return False
        self._run(claim)
        return True

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the process's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def start(self, claim: lifecycle.Claim) -> None:
        """Hand a claimed run (its slot taken) to the loop, from a Celery task's thread."""
        self.loop.call_soon_threadsafe(self._run, claim)

    def _start_reaping(self) -> None:
        # On the loop thread.
        if self.reaping is None:
            self.reaping = self.loop.create_task(self._reap_forever())

    def _run(self, claim: lifecycle.Claim) -> None:
        # On the loop thread.
        task = self.loop.create_task(self.runner.run_claimed(claim))
        self.runs.add(task)

        def done(task: asyncio.Task[str]) -> None:
            self.runs.discard(task)
            self.slots.release()
            if not task.cancelled() and task.exception() is not None:
                log.error(
                    "execution.crashed", execution_id=str(claim.id), exc_info=task.exception()
                )

        task.add_done_callback(done)

    async def _stop_runs(self, grace: float) -> None:
        """Runs in flight get `grace` seconds to end; the rest are cancelled and awaited:
        cancelled, a run hands its lease back (released at once) for another worker."""
        if self.reaping is not None:
            self.reaping.cancel()
        if self.runs:
            await asyncio.wait(set(self.runs), timeout=grace)
        left = set(self.runs)
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=5)

    def close(self) -> None:
        """A warm shutdown of this process (Celery's `worker_process_shutdown`). With
        REMAP_SIGTERM=SIGQUIT (the compose file and manifests) pool children are killed
        without it: then the runs' leases lapse and the reaper hands them on (~13 s)."""
        try:
            self.run(self._stop_runs(self.settings.engine.shutdown_grace_s))
            self.run(self.http.aclose())
            self.run(self.engine.dispose())
            self.run(self.single.dispose())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


_process: _Process | None = None
_process_lock = threading.Lock()


def process() -> _Process:
    global _process
    with _process_lock:
        if _process is None or _process.loop.is_closed():
            _process = _Process()
        return _process


@signals.worker_process_init.connect
def _open_process(**_: Any) -> None:
    # At the pool child's start, not at its first task: its reaper must run even in a
    # process that a restart left without work (the one that must take over the runs of
    # a worker that dies next).
    process()


@signals.worker_process_shutdown.connect
def _close_process(**_: Any) -> None:
    if _process is not None and not _process.loop.is_closed():
        _process.close()


def enqueue(execution_id: uuid.UUID, countdown: float = 0.0) -> None:
    """Send a run's message. Called on the engine's loop (a park, a sub-run that does not
    wait, the reaper): the send goes to a thread, so a broker that does not answer
    never stalls the loop the process's other runs and its heartbeat share; with the
    broker down it gives up quickly and the reaper sends it again from PostgreSQL."""
    # Never past what the broker can hold without redelivering (celery#2599).
    limit = get_settings().celery.max_countdown_s
    send_from_loop(
        Send(EXECUTE, [str(execution_id)], countdown=min(countdown, limit)),
        what={"execution_id": str(execution_id)},
    )


# What a claim may retry: the database or the network not answering. Anything else (a
# bad id, a bug in a finished-listener) is logged and the message acknowledged: retried
# forever it would hold a slot and the rest of its batch.
UNREACHABLE = (OperationalError, InterfaceError, OSError, PoolTimeout)


def _claim(p: _Process, execution_id: uuid.UUID) -> lifecycle.Claim | None:
    """The claim, retried while the database is unreachable (a restart, a failover)
    for up to ENGINE__CLAIM_RETRY_S: a blip costs seconds, not a reaper pass."""
    deadline = time.monotonic() + p.settings.engine.claim_retry_s
    pause = 0.25
    while True:
        try:
            return p.run(p.runner.claim(execution_id))
        except UNREACHABLE as exc:
            if time.monotonic() + pause > deadline:
                raise
            log.warning("execution.claim_retry", execution_id=str(execution_id), error=str(exc))
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


def _start(p: _Process, execution_id: str) -> str:
    """Claim one run and hand it to the process's loop; raises UNREACHABLE when the
    database could not be reached (the caller sends the message back)."""
    try:
        run_id = uuid.UUID(execution_id)
    except ValueError:
        log.error("execution.bad_message", execution_id=execution_id)
        return "bad_message"
    # At most ENGINE__RUNS_PER_PROCESS runs at once in this process: the next message
    # waits here (and the broker gives others to the other processes).
    p.slots.acquire()
    try:
        claim = _claim(p, run_id)
    except UNREACHABLE:
        p.slots.release()
        raise
    except Exception:
        p.slots.release()
        log.exception("execution.claim_failed", execution_id=execution_id)
        return "claim_failed"
    if claim is None:
        p.slots.release()
        return "not_claimed"
    p.start(claim)
    return "started"


# Sent back this many times (2 s apart, after ENGINE__CLAIM_RETRY_S of retries each)
# before a message is dropped; the reaper still finds its run pending in PostgreSQL.
MAX_CLAIM_RETRIES = 30


@celery_app.task(name=EXECUTE, bind=True, max_retries=MAX_CLAIM_RETRIES, ignore_result=True)
def execute(self: Task, execution_id: str) -> str:  # type: ignore[type-arg]
    try:
        return _start(process(), execution_id)
    except UNREACHABLE as exc:
        log.warning("execution.claim_failed", execution_id=execution_id, error=str(exc))
        # Back to the queue, not acknowledged away: the run has not started.
        raise self.retry(countdown=2, exc=exc) from None


@celery_app.task(name=EXECUTE_MANY, bind=True, max_retries=MAX_CLAIM_RETRIES, ignore_result=True)
def execute_many(self: Task, execution_ids: list[str]) -> dict[str, int]:  # type: ignore[type-arg]
    """Several runs in one message (POST /executions/batch): the broker's cost is paid
    once for all of them. Each run is claimed on its own, as with `workflow.execute`
    (CLAIMS_AT_ONCE of them concurrently); an unreachable database sends the message
    back with the runs not yet started."""
    p = process()
    started = 0
    rest = list(execution_ids)
    while rest:
        # As many at once as there are free slots (at least one: wait for it), up to
        # CLAIMS_AT_ONCE: a message never waits for slots it could do without.
        p.slots.acquire()
        taken = 1
        while taken < min(CLAIMS_AT_ONCE, len(rest)) and p.slots.acquire(blocking=False):
            taken += 1
        chunk, rest = rest[:taken], rest[taken:]
        try:
            started += _start_many(p, chunk)
        except _Unreachable as exc:
            log.warning("execution.claim_failed", execution_id=exc.execution_id, error=str(exc))
            again = [exc.execution_id, *exc.unstarted, *rest]
            raise self.retry(args=(again,), countdown=2, exc=exc.cause) from None
    return {"started": started, "runs": len(execution_ids)}


# A batch's runs are claimed up to this many at a time (as slots allow), concurrently on
# the process's loop: the task's thread waits once per chunk, not once per run.
CLAIMS_AT_ONCE = 10


class _Unreachable(Exception):
    """The database did not answer a claim (after its retries): the runs of the batch
    that were not started go back to the queue."""

    def __init__(self, execution_id: str, unstarted: list[str], cause: Exception) -> None:
        super().__init__(str(cause))
        self.execution_id = execution_id
        self.unstarted = unstarted
        self.cause = cause


def _start_many(p: _Process, execution_ids: list[str]) -> int:
    """Claim these runs at once (a slot already taken for each) and hand the claimed
    ones to the loop; a claim that fails on the database is tried again on its own
    (`_start`, with its retries). Raises _Unreachable naming the runs not started."""
    ids: list[tuple[str, uuid.UUID]] = []
    for execution_id in execution_ids:
        try:
            ids.append((execution_id, uuid.UUID(execution_id)))
        except ValueError:
            p.slots.release()
            log.error("execution.bad_message", execution_id=execution_id)

    async def claim_all() -> list[lifecycle.Claim | BaseException | None]:
        return await asyncio.gather(
            *(p.runner.claim(run_id) for _, run_id in ids), return_exceptions=True
        )

    try:
        claims = p.run(claim_all())
    except BaseException:
        for _ in ids:
            p.slots.release()
        raise
    started = 0
    again: list[str] = []
    for (execution_id, _), claim in zip(ids, claims, strict=True):
        if isinstance(claim, lifecycle.Claim):
            p.start(claim)
            started += 1
            continue
        p.slots.release()
        if isinstance(claim, UNREACHABLE):
            again.append(execution_id)
        elif claim is not None:
            log.error("execution.claim_failed", execution_id=execution_id, exc_info=claim)
    # Those the database did not answer, the slow way: each retried while it comes back.
    for index, execution_id in enumerate(again):
        try:
            started += _start(p, execution_id) == "started"
        except UNREACHABLE as exc:
            raise _Unreachable(execution_id, again[index + 1 :], exc) from exc
    return started


@celery_app.task(name="executions.archive_events")
def archive_events() -> int:
    """Copy the event logs of runs that ended to PostgreSQL (they outlive the streams)."""
    p = process()
    return p.run(_archive(p))


async def _archive(p: _Process) -> int:
    # event_log() belongs to the running loop: it must be called inside the coroutine
    # (called outside, it raised "no running event loop" on every tick).
    return await event_log().archive_pending(p.engine)


@celery_app.task(name="executions.reap")
def reap() -> dict[str, int]:
    p = process()
    requeue, lost = p.run(lifecycle.reap(p.sessionmaker, get_settings()))
    for execution_id in requeue:
        enqueue(execution_id)
    if requeue:
        log.warning("executions.reaped", count=len(requeue))
    return {"requeued": len(requeue), "lost_messages": lost}
