"""The process's heartbeat: one task per worker process looks at every run the process
holds in one query (cancel requests, leases lost) and renews all their leases in one
statement, instead of a watcher and two queries per run.

Leases are short (ENGINE__LEASE_S) and renewed every third of that, so a dead worker's
runs are free again within a lease, while a busy but live worker never loses one: the
heartbeat runs on the same event loop as the runs, and a template cannot hold that loop
for more than its render budget (about a second)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.executions import lifecycle
from backend.executions.lifecycle import Claim
from backend.kit.logging import get_logger

log = get_logger(__name__)


@dataclass
class Held:
    claim: Claim
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    renewed_at: float = field(default_factory=time.monotonic)

    def stop(self, why: str) -> None:
        if why == "lost":
            self.claim.stop = "lost"
            self.lost.set()
        else:
            self.claim.stop = self.claim.stop or why
        self.cancel.set()


class Heartbeat:
    def __init__(self, settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        # By lease token: the same run may be claimed again by this very process (its
        # lease lapsed while the loop stalled); the older claim must then stop, not hide.
        self.held: dict[str, Held] = {}
        self._task: asyncio.Task[None] | None = None

    def hold(self, claim: Claim) -> Held:
        for other in self.held.values():
            if other.claim.id == claim.id:
                other.stop("lost")
        held = self.held[claim.token] = Held(claim)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._beat())
        return held

    def let_go(self, claim: Claim) -> None:
        self.held.pop(claim.token, None)
        if not self.held and self._task is not None:
            # Nothing left to watch: no task outlives the last run (tests reuse loops).
            self._task.cancel()
            self._task = None

    async def _beat(self) -> None:
        engine = self.settings.engine
        renew_every = engine.lease_s / 3
        last_renewal = time.monotonic()
        with contextlib.suppress(asyncio.CancelledError):
            while self.held:
                await asyncio.sleep(engine.watch_interval_s)
                held = list(self.held.values())
                if not held:
                    continue
                try:
                    # A look or renewal that hangs (a half-open connection, a locked
                    # row) must not outlast the lease it is meant to keep.
                    async with asyncio.timeout(renew_every):
                        claims = [h.claim for h in held]
                        lost, cancel = await lifecycle.look(self.sessionmaker, claims)
                        if time.monotonic() - last_renewal >= renew_every:
                            ours = await lifecycle.renew(self.sessionmaker, claims, engine.lease_s)
                            last_renewal = time.monotonic()
                            lost |= {c.id for c in claims} - ours
                            for h in held:
                                if h.claim.id in ours:
                                    h.renewed_at = last_renewal
                    for h in held:
                        if h.claim.id in lost:
                            h.stop("lost")
                        elif h.claim.id in cancel:
                            h.stop("cancel")
                except Exception:
                    # A database blip must not silently end the watch: log, try again.
                    log.exception("execution.heartbeat_failed", runs=len(held))
                # Checked on every beat, not only after an error: a lease this process
                # could not renew for most of its length may be someone else's soon, so
                # its runs stop before anything could run twice.
                stale = time.monotonic() - engine.lease_s * 0.8
                for h in held:
                    if h.renewed_at < stale:
                        h.stop("lost")
