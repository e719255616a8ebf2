"""Execution tasks: `workflow.execute` runs a run; `executions.reap` finds runs whose
worker died or whose message was lost, and hands them on."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from datetime import timedelta
from typing import Any

from celery import signals
from sqlalchemy import func, or_, select

from backend.config import get_settings
from backend.executions.state import ExecutionStatus, transition
from backend.kit.celery_app import celery_app
from backend.kit.db import UnitOfWork, create_engine, create_sessionmaker
from backend.kit.http_guard import guarded_client
from backend.kit.logging import get_logger
from backend.models import WorkflowExecution
from backend.realtime.events import event_log, publish_after_commit
from workers.engine.runner import Runner

log = get_logger(__name__)
EXECUTE = "workflow.execute"


class _Process:
    """Per worker process: one event loop, one database pool, one HTTP client, kept
    across tasks (async connections belong to the loop that opened them)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        settings = get_settings()
        # No pre-ping on the worker's hot path: the runner retries a checkpoint whose
        # connection turned out dead instead (see Runner._write).
        self.engine = create_engine(
            settings.model_copy(
                update={"db": settings.db.model_copy(update={"pool_pre_ping": False})}
            )
        )
        self.sessionmaker = create_sessionmaker(self.engine)
        self.http = guarded_client(
            settings.http.allow_private_networks, user_agent=settings.http.user_agent
        )
        self.runner = Runner(
            settings, self.sessionmaker, self.http, f"{socket.gethostname()}:{os.getpid()}", enqueue
        )


_process: _Process | None = None


def process() -> _Process:
    global _process
    if _process is None or _process.loop.is_closed():
        _process = _Process()
    return _process


@signals.worker_process_shutdown.connect
def _close_process(**_: Any) -> None:
    if _process is not None and not _process.loop.is_closed():
        _process.loop.run_until_complete(_process.http.aclose())
        _process.loop.run_until_complete(_process.engine.dispose())
        _process.loop.close()


def enqueue(execution_id: uuid.UUID, countdown: float = 0.0) -> None:
    # Never past what the broker can hold without redelivering (celery#2599).
    limit = get_settings().celery.max_countdown_s
    celery_app.send_task(EXECUTE, args=[str(execution_id)], countdown=min(countdown, limit) or None)


@celery_app.task(name=EXECUTE)
def execute(execution_id: str) -> str:
    p = process()
    return str(p.loop.run_until_complete(p.runner.execute(uuid.UUID(execution_id))))


@celery_app.task(name="executions.archive_events")
def archive_events() -> int:
    """Copy the event logs of runs that ended to PostgreSQL (they outlive the streams)."""
    p = process()
    return p.loop.run_until_complete(_archive(p))


async def _archive(p: _Process) -> int:
    # event_log() belongs to the running loop: it must be called inside the coroutine
    # (called before run_until_complete, it raised "no running event loop" on every tick).
    return await event_log().archive_pending(p.engine)


@celery_app.task(name="executions.reap")
def reap() -> dict[str, int]:
    p = process()
    return p.loop.run_until_complete(_reap())


async def _reap() -> dict[str, int]:
    """Nothing stays running or pending forever: a run whose lease lapsed goes back to
    pending and is re-enqueued (its checkpoints make that safe); a pending run nobody
    claimed in time is re-enqueued (its message was lost), at most once per grace
    period. The claim's delivery cap fails a run that keeps dying. Times are the
    database's, so workers' clocks never decide whose lease lapsed."""
    settings = get_settings()
    grace = timedelta(seconds=settings.engine.pending_grace_s)
    requeue: list[uuid.UUID] = []
    p = process()
    async with UnitOfWork(p.sessionmaker) as uow:
        session = uow.session
        now = await session.scalar(select(func.now()))
        assert now is not None
        stale = await session.scalars(
            select(WorkflowExecution)
            .where(
                WorkflowExecution.status == ExecutionStatus.RUNNING,
                WorkflowExecution.lease_expires_at < now,
            )
            .limit(500)
            .with_for_update(skip_locked=True)
        )
        for ex in stale.all():
            transition(
                "execution", ex.status, ExecutionStatus.PENDING, at=now, reason="lease expired"
            )
            ex.status = ExecutionStatus.PENDING
            ex.lease_owner = None
            ex.lease_expires_at = None
            publish_after_commit(uow, ex)
            requeue.append(ex.id)
        lost = await session.scalars(
            select(WorkflowExecution)
            .where(
                WorkflowExecution.status == ExecutionStatus.PENDING,
                WorkflowExecution.updated_at < now - grace,
                or_(WorkflowExecution.resume_at.is_(None), WorkflowExecution.resume_at <= now),
            )
            .limit(500)
            .with_for_update(skip_locked=True)
        )
        lost_rows = list(lost.all())
        for ex in lost_rows:
            # Touched, so the next tick leaves it alone for another grace period.
            ex.updated_at = now
            requeue.append(ex.id)
    for execution_id in requeue:
        enqueue(execution_id)
    if requeue:
        log.warning("executions.reaped", count=len(requeue))
    return {"requeued": len(requeue), "lost_messages": len(lost_rows)}
