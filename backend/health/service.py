"""Readiness: can this process reach PostgreSQL, Redis and the Celery broker right now?"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import anyio
from celery import Celery
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.kit.logging import get_logger

log = get_logger(__name__)


async def _database(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


async def _redis(redis: Redis) -> None:
    await redis.ping()


def _broker_sync(celery: Celery, timeout_s: float) -> None:
    with celery.connection_for_write() as conn:
        # Connecting opens a channel, and kombu's Redis channel PINGs the server on
        # creation: a real round trip, without declaring or sending anything.
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=max(1, int(timeout_s)))


async def _broker(celery: Celery, timeout_s: float) -> None:
    # kombu is synchronous; a thread keeps the event loop free. abandon_on_cancel lets
    # the probe answer on time even if the thread is stuck in a connect.
    await anyio.to_thread.run_sync(_broker_sync, celery, timeout_s, abandon_on_cancel=True)


async def readiness(
    engine: AsyncEngine, redis: Redis, celery: Celery, timeout_s: float
) -> dict[str, str]:
    """Check every dependency concurrently; each maps to "ok" or the reason it failed."""
    checks: dict[str, Callable[[], Awaitable[None]]] = {
        "database": lambda: _database(engine),
        "redis": lambda: _redis(redis),
        "broker": lambda: _broker(celery, timeout_s),
    }

    async def run(name: str, check: Callable[[], Awaitable[None]]) -> tuple[str, str]:
        try:
            await asyncio.wait_for(check(), timeout_s)
        except TimeoutError:
            log.warning("health.dependency_down", dependency=name, reason="timeout")
            return name, "timeout"
        except Exception as exc:
            log.warning("health.dependency_down", dependency=name, reason=type(exc).__name__)
            return name, f"error: {type(exc).__name__}"
        return name, "ok"

    results = await asyncio.gather(*(run(n, c) for n, c in checks.items()))
    return dict(results)
