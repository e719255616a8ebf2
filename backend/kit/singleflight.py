"""One load per key at a time: callers that miss a cache together share the first one's
load instead of each running it (the runs of a version that start or end together, a
burst after a deploy). The load runs as a task of its own, so a caller cancelled while
it waits (its run was) does not cancel the others' load."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class SingleFlight(Generic[V]):
    def __init__(self, timeout_s: float = 30.0) -> None:
        # Keyed by loop too: a task belongs to the loop that made it.
        self._loads: dict[tuple[int, Hashable], asyncio.Task[V]] = {}
        # A load stuck on a half-open connection would hold every caller of its key.
        self.timeout_s = timeout_s

    async def do(self, key: Hashable, load: Callable[[], Awaitable[V]]) -> V:
        loop = asyncio.get_running_loop()
        flight = (id(loop), key)
        task = self._loads.get(flight)
        if task is not None and task.get_loop() is not loop:
            task = None  # a closed loop's task, whose id a new loop reuses (tests)
        if task is None:

            async def run() -> V:
                async with asyncio.timeout(self.timeout_s):
                    return await load()

            task = asyncio.ensure_future(run())
            self._loads[flight] = task

            def done(finished: asyncio.Task[V]) -> None:
                self._loads.pop(flight, None)
                if not finished.cancelled():
                    finished.exception()  # retrieved: its waiters may all be gone

            task.add_done_callback(done)
        return await asyncio.shield(task)
