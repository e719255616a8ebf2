"""Rate limits on Redis (the `limits` library, moving windows), shared by every API
process. A breach raises RateLimited with the seconds until a slot frees up.

With Redis unreachable a budget either fails open or refuses with 503, by what it
protects (the first part of its key names it):

- capacity budgets (`api`: every signed-in request; `hook`: each webhook address) fail
  open. They share the load fairly; refusing them would turn a Redis outage into an
  outage of the whole API while PostgreSQL, the source of truth, is up, and a run it
  admits is not lost (the reaper enqueues committed runs nobody claimed).
- abuse guards (sign-in codes requested, tried and failed; invitations sent) fail
  closed with DependencyUnavailable (503 `dependency_unavailable`): without them a
  Redis outage would lift the cap on guessing sign-in codes or mailing strangers, and
  both are rare, interactive requests a person can retry.

Capacity budgets count with a sliding window counter (two integers per key, one Lua
call: O(1) whatever the limit), abuse guards with an exact moving window (a list of one
timestamp per hit, which its Lua script walks up to the limit). The counter weighs the
previous window by how much of it still overlaps, so it can be off by a fraction of
one window's worth at its edges; that is fine for sharing load and not for counting
guesses at a sign-in code.
"""

from __future__ import annotations

import time
from functools import lru_cache

from limits import RateLimitItem
from limits import parse as parse_limit
from limits.aio.storage import RedisStorage
from limits.aio.strategies import (
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.errors import StorageError
from redis.exceptions import RedisError

from backend.kit.errors import DependencyUnavailable, RateLimited
from backend.kit.logging import get_logger

log = get_logger(__name__)

FAIL_OPEN = frozenset({"api", "hook"})
# Capacity budgets: the counter strategy (see above). The same set fails open.
CAPACITY = FAIL_OPEN

# Limits come from settings, a handful of strings: parse each once.
parse = lru_cache(maxsize=128)(parse_limit)


class RateLimiter:
    def __init__(
        self, redis_url: str, *, timeout_s: float = 2.0, connect_timeout_s: float = 2.0
    ) -> None:
        uri = "async+" + redis_url if not redis_url.startswith("async+") else redis_url
        # Timeouts: a Redis that does not answer must not hold a request forever.
        self._storage = RedisStorage(
            uri,
            implementation="redispy",
            key_prefix="orch-rl",
            wrap_exceptions=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=connect_timeout_s,
        )
        self._exact = MovingWindowRateLimiter(self._storage)
        self._counter = SlidingWindowCounterRateLimiter(self._storage)

    def _strategy(
        self, key: tuple[str, ...]
    ) -> MovingWindowRateLimiter | SlidingWindowCounterRateLimiter:
        return self._counter if key and key[0] in CAPACITY else self._exact

    async def hit(self, limit: str, *key: str, what: str = "requests") -> None:
        item = parse(limit)
        try:
            allowed = await self._strategy(key).hit(item, *key)
        except (StorageError, RedisError) as exc:
            self._unavailable(key, exc)
            return
        if not allowed:
            await self._refuse(item, key, what)

    async def check(self, limit: str, *key: str, what: str = "requests") -> None:
        """Refuse if the budget is spent, without spending any of it."""
        item = parse(limit)
        try:
            allowed = await self._strategy(key).test(item, *key)
        except (StorageError, RedisError) as exc:
            self._unavailable(key, exc)
            return
        if not allowed:
            await self._refuse(item, key, what)

    async def spend(self, limit: str, *key: str) -> None:
        """Spend one unit (a failure, say) without refusing this request."""
        try:
            await self._strategy(key).hit(parse(limit), *key)
        except (StorageError, RedisError) as exc:
            self._unavailable(key, exc)

    def _unavailable(self, key: tuple[str, ...], exc: Exception) -> None:
        budget = key[0] if key else ""
        fail_open = budget in FAIL_OPEN
        log.warning(
            "ratelimit.unavailable", budget=budget, fail_open=fail_open, error=type(exc).__name__
        )
        if not fail_open:
            raise DependencyUnavailable(
                "rate limiting is unavailable (Redis did not answer); try again shortly"
            ) from None

    async def _refuse(self, item: RateLimitItem, key: tuple[str, ...], what: str) -> None:
        try:
            stats = await self._strategy(key).get_window_stats(item, *key)
            retry_after = max(1, int(stats.reset_time - time.time()) + 1)
        except (StorageError, RedisError):
            retry_after = item.get_expiry()
        raise RateLimited(
            f"too many {what}; try again in {retry_after} s", retry_after_s=retry_after
        )
