"""Rate limits on Redis (the `limits` library, moving windows), shared by every API
process. A breach raises RateLimited with the seconds until a slot frees up."""

from __future__ import annotations

import time

from limits import parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter

from backend.kit.errors import RateLimited


class RateLimiter:
    def __init__(self, redis_url: str) -> None:
        uri = "async+" + redis_url if not redis_url.startswith("async+") else redis_url
        self._storage = RedisStorage(uri, implementation="redispy", key_prefix="orch-rl")
        self._limiter = MovingWindowRateLimiter(self._storage)

    async def hit(self, limit: str, *key: str, what: str = "requests") -> None:
        if not await self._limiter.hit(parse(limit), *key):
            await self._refuse(limit, key, what)

    async def check(self, limit: str, *key: str, what: str = "requests") -> None:
        """Refuse if the budget is spent, without spending any of it."""
        if not await self._limiter.test(parse(limit), *key):
            await self._refuse(limit, key, what)

    async def spend(self, limit: str, *key: str) -> None:
        """Spend one unit (a failure, say) without refusing this request."""
        await self._limiter.hit(parse(limit), *key)

    async def _refuse(self, limit: str, key: tuple[str, ...], what: str) -> None:
        stats = await self._limiter.get_window_stats(parse(limit), *key)
        retry_after = max(1, int(stats.reset_time - time.time()) + 1)
        raise RateLimited(
            f"too many {what}; try again in {retry_after} s", retry_after_s=retry_after
        )
