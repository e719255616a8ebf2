"""Send Celery tasks by name: after a unit of work commits, or from an event loop.

The API never imports `workers`; it names tasks. Every send here goes through `send`
(one retry policy, no result subscription) and, from async code, runs in a thread
because kombu is synchronous: a broker that does not answer must not stall the loop
that requests, runs and heartbeats share. The threads are a small pool of their own
(SENDER_THREADS), not one per request in flight.

With the broker down, a publish gives up within a second instead of retrying for long:
the row it is about is committed, so the request is answered as admitted, and what was
not enqueued is recovered from the database (the reaper enqueues pending runs nobody
claimed). The request does not wait on the result backend either: nobody reads these
tasks' results (their state is in PostgreSQL), and subscribing to one with Redis down
retried for about 20 s before the answer went out.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from backend.kit.celery_app import celery_app
from backend.kit.db import UnitOfWork
from backend.kit.logging import get_logger

log = get_logger(__name__)

PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}


@dataclass(frozen=True)
class Send:
    """One task message."""

    task: str
    args: Sequence[Any] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    countdown: float | None = None
    # What Flower and the worker's log show instead of the arguments.
    argsrepr: str | None = None


def send(*messages: Send) -> None:
    """Publish now, in this thread (blocks while kombu talks to the broker)."""
    for m in messages:
        celery_app.send_task(
            m.task,
            args=list(m.args),
            kwargs=m.kwargs,
            countdown=m.countdown or None,
            argsrepr=m.argsrepr,
            ignore_result=True,
            retry_policy=PUBLISH_RETRY,
        )


# The threads that publish for async code: few and long-lived. A thread per publish
# (anyio's pool grows to one per request in flight) meant dozens of threads taking turns
# at the interpreter lock with the event loop, and each new one set up Celery's
# per-thread producer state again. With the broker down, at most this many publishes
# wait out their retries at once; the rest queue behind them.
SENDER_THREADS = 4
_senders: ThreadPoolExecutor | None = None
_senders_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _senders
    if _senders is None:
        with _senders_lock:
            if _senders is None:
                _senders = ThreadPoolExecutor(SENDER_THREADS, thread_name_prefix="task-send")
    return _senders


def _forget_senders() -> None:
    # A forked child (a Celery prefork worker) has none of its parent's threads.
    global _senders, _senders_lock
    _senders, _senders_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_senders)


async def send_in_thread(*messages: Send, context: contextvars.Context | None = None) -> None:
    """Publish from async code: one hop to a sender thread for all of them, in the
    caller's context (or the one given: a fresh, unentered one)."""
    # In the caller's context: the publish's trace span joins the request's trace, and
    # its log lines and message headers carry the request id (run_in_executor does not
    # copy contextvars).
    if context is None:
        context = contextvars.copy_context()
    await asyncio.get_running_loop().run_in_executor(
        _executor(), functools.partial(context.run, send, *messages)
    )


def send_from_loop(*messages: Send, what: dict[str, Any] | None = None) -> None:
    """Fire and forget from code on an event loop that cannot await (a callback): the
    send goes to the loop's executor; a failure is logged (`what` names the subject)
    and left to the reaper. Without a running loop (a Celery task's own thread) it
    sends in place."""

    def publish() -> None:
        try:
            send(*messages)
        except Exception as exc:
            log.warning("task.send_failed", tasks=[m.task for m in messages], error=str(exc),
                        **(what or {}))  # fmt: skip

    try:
        asyncio.get_running_loop().run_in_executor(None, publish)
    except RuntimeError:
        publish()


def enqueue_after_commit(
    uow: UnitOfWork, task: str, *args: Any, argsrepr: str | None = None, **kwargs: Any
) -> None:
    message = Send(task, args, kwargs, argsrepr=argsrepr)

    async def publish() -> None:
        await send_in_thread(message)

    publish.__name__ = f"enqueue:{task}"
    uow.after_commit(publish)
