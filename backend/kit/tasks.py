"""Enqueue Celery tasks by name, after the unit of work commits.

The API never imports `workers`; it names tasks. Publishing runs in a thread because
kombu is synchronous.

With the broker down, a publish gives up within a second instead of retrying for long:
the row it is about is committed, so the request is answered as admitted, and what was
not enqueued is recovered from the database (the reaper enqueues pending runs nobody
claimed). The request does not wait on the result backend either: nobody reads these
tasks' results (their state is in PostgreSQL), and subscribing to one with Redis down
retried for about 20 s before the answer went out.
"""

from __future__ import annotations

from typing import Any

import anyio

from backend.kit.celery_app import celery_app
from backend.kit.db import UnitOfWork

PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}


def enqueue_after_commit(
    uow: UnitOfWork, task: str, *args: Any, argsrepr: str | None = None, **kwargs: Any
) -> None:
    async def publish() -> None:
        await anyio.to_thread.run_sync(
            lambda: celery_app.send_task(
                task,
                args=args,
                kwargs=kwargs,
                argsrepr=argsrepr,
                ignore_result=True,
                retry_policy=PUBLISH_RETRY,
            )
        )

    publish.__name__ = f"enqueue:{task}"
    uow.after_commit(publish)
