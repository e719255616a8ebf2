"""Enqueue Celery tasks by name, after the unit of work commits.

The API never imports `workers`; it names tasks. Publishing runs in a thread because
kombu is synchronous and, with the broker down, retries its connection for a while.
"""

from __future__ import annotations

from typing import Any

import anyio

from backend.kit.celery_app import celery_app
from backend.kit.db import UnitOfWork


def enqueue_after_commit(
    uow: UnitOfWork, task: str, *args: Any, argsrepr: str | None = None, **kwargs: Any
) -> None:
    async def publish() -> None:
        await anyio.to_thread.run_sync(
            lambda: celery_app.send_task(task, args=args, kwargs=kwargs, argsrepr=argsrepr)
        )

    publish.__name__ = f"enqueue:{task}"
    uow.after_commit(publish)
