"""One node, attempt after attempt: run its handler under its timeout, classify what
went wrong, wait in place for short retries, and say how it ended. Shared by a run's
own nodes and a loop body's nodes, which differ only in what they do with the outcome."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from backend.config import Settings
from backend.workflows.graph import RetryPolicy, ValidGraph
from workers.engine.checkpoints import now
from workers.engine.retry import NodeFailure, classify, retry_delay
from workers.nodes.base import Handler, NodeContext, NodeResult


@dataclass
class Attempted:
    attempt: int
    started: datetime
    elapsed_ms: float
    result: NodeResult | None = None
    # The output's JSON size, measured once (the event reuses it).
    size: int = 0
    failure: NodeFailure | None = None
    # Set with a failure worth another attempt after a wait too long to hold a slot.
    retry_in: float | None = None

    def error(self) -> dict[str, Any]:
        assert self.failure is not None
        return {
            "message": self.failure.message,
            "class": self.failure.error_class,
            "attempt": self.attempt,
        }


def node_time_limit(run_started: datetime, graph: ValidGraph, node_timeout: float | None) -> float:
    """Seconds a node attempt may take: its own timeout, never past its run's deadline."""
    left_in_run = (
        run_started + timedelta(seconds=graph.settings.timeout_s) - now()
    ).total_seconds()
    return max(0.1, min(node_timeout or graph.settings.timeout_s, left_in_run))


def output_size(result: NodeResult, limit: int) -> int:
    size = len(json.dumps(result.output, default=str))
    if size > limit:
        raise NodeFailure(f"output is {size} bytes, over the {limit} limit", "permanent")
    return size


async def attempt_node(
    ctx: NodeContext,
    handler: Handler,
    *,
    policy: RetryPolicy,
    settings: Settings,
    time_limit: Callable[[], float],
    first_attempt: int = 1,
    on_start: Callable[[int], None] | None = None,
) -> Attempted:
    """Attempts from `first_attempt` until one completes, one fails for good, or a
    retry would wait longer than `engine.inline_retry_max_s`. Cancellation propagates."""
    attempt = first_attempt
    while True:
        ctx.attempt = attempt
        if on_start is not None:
            on_start(attempt)
        started = now()
        t0 = time.perf_counter()
        try:
            seconds = time_limit()
            # Templates check the same deadline while they render (they cannot be
            # interrupted by the event loop they block).
            ctx.deadline = time.monotonic() + seconds
            async with asyncio.timeout(seconds):
                result = await handler(ctx)
            size = output_size(result, settings.engine.max_output_bytes)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failure = classify(exc)
            delay = retry_delay(
                failure,
                attempt=attempt,
                max_retries=policy.max_retries,
                backoff_s=policy.backoff_s,
                retry_on=list(policy.on),
                max_countdown_s=settings.celery.max_countdown_s,
            )
            if delay is not None and delay <= settings.engine.inline_retry_max_s:
                await asyncio.sleep(delay)
                attempt += 1
                continue
            elapsed = round((time.perf_counter() - t0) * 1000, 3)
            return Attempted(attempt, started, elapsed, failure=failure, retry_in=delay)
        elapsed = round((time.perf_counter() - t0) * 1000, 3)
        # Child runs' spend counts on the node that started them, so the run's totals
        # include everything it caused.
        result.input_tokens += int(ctx.usage[0])
        result.output_tokens += int(ctx.usage[1])
        result.cost_usd += ctx.usage[2]
        return Attempted(attempt, started, elapsed, result=result, size=size)
