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

A capacity budget's hit runs on every signed-in request, so it skips the library: one
EVALSHA of the counter's script (ours, below: the library's acquire script that also
answers the window's figures when it refuses, so a refusal needs no second call, and
takes several units at once), sent through redis-py's client on the library's own keys
and connection pool. Both paths count in the same keys, so `check` and `spend`
(through the library) and processes of an older version see one count. A busy caller's
units are taken in batches and spent in the process (MAX_BATCH, ALLOWANCE_S below):
one script call per batch instead of one per request.
"""

from __future__ import annotations

import asyncio
import math
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
from redis.asyncio import ConnectionPool, Redis
from redis.exceptions import RedisError

from backend.kit.errors import DependencyUnavailable, RateLimited
from backend.kit.logging import get_logger

log = get_logger(__name__)

FAIL_OPEN = frozenset({"api", "hook"})
# Capacity budgets: the counter strategy (see above). The same set fails open.
CAPACITY = FAIL_OPEN

# Limits come from settings, a handful of strings: parse each once.
parse = lru_cache(maxsize=128)(parse_limit)

KEY_PREFIX = "orch-rl"

# The sliding window counter's hit, as the library's acquire_sliding_window.lua (same
# keys, same arithmetic: shift an expired current window to the previous one, weigh
# the previous count by the share of it still inside the window), except that:
# - it takes up to ARGV[3] units, as many as the window still has (at least one):
#   {1, taken, the window's mark} when it counted them and, when not even one is left,
#   {0, previous count, previous TTL ms, current count, current TTL ms}: what the
#   Retry-After is computed from;
# - it first gives back ARGV[4] units an earlier call took and the caller did not spend,
#   to the window they were counted in (ARGV[5], its mark) if that window is still one
#   of the two keys. A window's mark is when its key expires (server clock + TTL): the
#   same over the key's life, also after it became the previous window.
SLIDING_HIT = """
local limit = tonumber(ARGV[1])
local expiry = tonumber(ARGV[2]) * 1000
local wanted = tonumber(ARGV[3])
local giveback = tonumber(ARGV[4])
local giveback_mark = tonumber(ARGV[5])
local clock = redis.call('time')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
if giveback > 0 then
    for _, name in ipairs(KEYS) do
        local ttl = tonumber(redis.call('pttl', name))
        if ttl > 0 and math.abs(now + ttl - giveback_mark) <= 2 then
            local count = tonumber(redis.call('get', name)) or 0
            local back = math.min(giveback, count)
            if back > 0 then
                redis.call('decrby', name, back)
            end
            break
        end
    end
end
local current_ttl = tonumber(redis.call('pttl', KEYS[2]))
if current_ttl > 0 and current_ttl < expiry then
    redis.call('rename', KEYS[2], KEYS[1])
    redis.call('set', KEYS[2], 0, 'PX', current_ttl + expiry)
end
local previous_count = tonumber(redis.call('get', KEYS[1])) or 0
local previous_ttl = tonumber(redis.call('pttl', KEYS[1])) or 0
local current_count = tonumber(redis.call('get', KEYS[2])) or 0
current_ttl = tonumber(redis.call('pttl', KEYS[2])) or 0
if previous_ttl < 0 then previous_ttl = 0 end
if current_ttl < 0 then current_ttl = 0 end
local weighted = math.floor(previous_count * previous_ttl / expiry) + current_count
local amount = math.min(wanted, limit - weighted)
if amount >= 1 then
    if redis.call('exists', KEYS[2]) == 1 then
        redis.call('incrby', KEYS[2], amount)
    else
        redis.call('set', KEYS[2], amount, 'PX', expiry * 2)
    end
    return {1, amount, now + tonumber(redis.call('pttl', KEYS[2]))}
end
return {0, previous_count, previous_ttl, current_count, current_ttl}
"""

# A process takes a busy caller's units from Redis in batches and spends them locally
# (one script call per batch, not per request): a batch doubles each time the previous
# one was used up while it was still good, up to MAX_BATCH and one fiftieth of the
# limit (so limits under 100 are counted one by one, exactly), and falls back to one
# unit when the caller slows down. One request per key and process takes a batch at a
# time (the others wait for it, then spend from it, or share its refusal or its finding
# Redis silent). Units taken are counted in Redis at once and spent within ALLOWANCE_S;
# what is left then goes back to its window with the caller's next take in this process
# (if the caller never comes back to it, they stay counted until their window ends). So
# a caller may be refused up to (batch - 1) units early per process (units another
# process holds), and may spend a unit up to ALLOWANCE_S after the window it was counted
# in ended.
MAX_BATCH = 16
ALLOWANCE_S = 1.0
# A bound on memory: past it, lapsed allowances are dropped, then the oldest.
MAX_ALLOWANCES = 20_000


def _cap(amount: int) -> int:
    """The largest batch for a limit of `amount` per window."""
    return max(1, min(MAX_BATCH, amount // 50))


# A batch's outcome for the requests that waited for it: Redis did not answer (fail open).
_OPEN = object()


class _Taking:
    """A batch being taken for one caller: its waiters, and what came of it (None: taken,
    spend from it; _OPEN; or the RateLimited it was refused with)."""

    __slots__ = ("done", "outcome")

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.outcome: object = None


class _Allowance:
    __slots__ = ("batch", "left", "mark", "until")

    def __init__(self, batch: int, left: int, until: float, mark: int) -> None:
        self.batch = batch
        self.left = left
        self.until = until
        # The window the units were counted in (the script's mark), to give them back.
        self.mark = mark


@lru_cache(maxsize=4096)
def _sliding_keys(limit: str, key: tuple[str, ...]) -> tuple[str, str, int, int]:
    """(previous window key, current window key, limit, window seconds), as the library
    names them: "<prefix>:{<item key>}/-1" and "<prefix>:{<item key>}"."""
    item = parse(limit)
    current = f"{KEY_PREFIX}:{{{item.key_for(*key)}}}"
    return f"{current}/-1", current, item.amount, item.get_expiry()


def sliding_retry_after(
    expiry_s: int, previous: int, previous_ttl_ms: int, current: int, current_ttl_ms: int
) -> int:
    """Seconds until a refused counter frees a slot: the library's window stats (the
    sooner of the previous window's next weighted unit dropping out and the current
    window's end), rounded up, at least 1."""
    soonest = math.inf
    if previous:
        soonest = (previous_ttl_ms / 1000) % (expiry_s / previous)
    if current:
        soonest = min(soonest, (current_ttl_ms / 1000) % expiry_s)
    if soonest == math.inf:
        return 1
    return max(1, int(soonest) + 1)


class RateLimiter:
    def __init__(
        self, redis_url: str, *, timeout_s: float = 2.0, connect_timeout_s: float = 2.0
    ) -> None:
        url = redis_url.removeprefix("async+")
        # Timeouts: a Redis that does not answer must not hold a request forever.
        pool = ConnectionPool.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=connect_timeout_s
        )
        # One pool for both paths: the hot hit below and the library's strategies.
        self._redis = Redis(connection_pool=pool)
        self._storage = RedisStorage(
            "async+" + url,
            implementation="redispy",
            key_prefix=KEY_PREFIX,
            wrap_exceptions=True,
            # Typed as scalar options, but its redis-py bridge takes a pool (use_basic).
            connection_pool=pool,  # type: ignore[arg-type]
        )
        self._exact = MovingWindowRateLimiter(self._storage)
        self._counter = SlidingWindowCounterRateLimiter(self._storage)
        # redis-py's script object: EVALSHA, and EVAL once when Redis does not have it
        # (a fresh or flushed server).
        self._sliding_hit = self._redis.register_script(SLIDING_HIT)
        # (limit, key) -> the units this process holds for it, and the requests taking
        # a batch for it now.
        self._allowances: dict[tuple[str, tuple[str, ...]], _Allowance] = {}
        self._taking: dict[tuple[str, tuple[str, ...]], _Taking] = {}

    def _strategy(
        self, key: tuple[str, ...]
    ) -> MovingWindowRateLimiter | SlidingWindowCounterRateLimiter:
        return self._counter if key and key[0] in CAPACITY else self._exact

    async def hit(self, limit: str, *key: str, what: str = "requests") -> None:
        if key and key[0] in CAPACITY:
            await self._hit_counter(limit, key, what)
            return
        item = parse(limit)
        try:
            allowed = await self._strategy(key).hit(item, *key)
        except (StorageError, RedisError) as exc:
            self._unavailable(key, exc)
            return
        if not allowed:
            await self._refuse(item, key, what)

    async def _hit_counter(self, limit: str, key: tuple[str, ...], what: str) -> None:
        name = (limit, key)
        amount = _sliding_keys(limit, key)[2]
        if _cap(amount) == 1:
            # Counted one by one: nothing is kept, so nothing to wait for.
            await self._take(name, None, time.monotonic(), what)
            return
        while True:
            held = self._allowances.get(name)
            now = time.monotonic()
            if held is not None and held.left > 0 and now < held.until:
                held.left -= 1
                return
            taking = self._taking.get(name)
            if taking is None:
                break
            # Another request of this caller is taking a batch: spend from it, or share
            # its outcome (each waiter asking Redis in turn would queue them behind one
            # another: N timeouts in a row with Redis silent).
            await taking.done.wait()
            if taking.outcome is _OPEN:
                return
            if isinstance(taking.outcome, RateLimited):
                refused = taking.outcome
                raise RateLimited(refused.detail, retry_after_s=refused.retry_after_s)
        taking = self._taking[name] = _Taking()
        try:
            taking.outcome = await self._take(name, held, now, what)
        except RateLimited as exc:
            taking.outcome = exc
            raise
        finally:
            del self._taking[name]
            taking.done.set()

    async def _take(
        self,
        name: tuple[str, tuple[str, ...]],
        held: _Allowance | None,
        now: float,
        what: str,
    ) -> object:
        """Take a batch from Redis (None), or find Redis silent and fail open (_OPEN);
        RateLimited when not even one unit is left."""
        limit, key = name
        previous_key, current_key, amount, expiry = _sliding_keys(limit, key)
        # Used up while still good: a busy caller, take more this time.
        busy = held is not None and now < held.until
        cap = _cap(amount)
        batch = min(cap, held.batch * 2) if held is not None and busy else 1
        unspent, mark = 0, 0
        if held is not None:
            # Given back by this call. Taken off before it is sent: a call whose answer
            # is lost (a timeout, a cancellation) may have given them back already, and
            # giving them back twice would take units other processes counted.
            unspent, mark, held.left = held.left, held.mark, 0
        args = [amount, expiry, batch, unspent, mark]
        try:
            answer = await self._sliding_hit(keys=[previous_key, current_key], args=args)
        except RedisError as exc:
            self._unavailable(key, exc)
            return _OPEN
        if answer[0]:
            taken = int(answer[1])
            if cap > 1:
                # Kept even for a single unit: the next hit within ALLOWANCE_S doubles.
                self._hold(name, _Allowance(batch, taken - 1, now + ALLOWANCE_S, int(answer[2])))
            return None
        self._allowances.pop(name, None)
        retry_after = sliding_retry_after(expiry, *(int(v) for v in answer[1:5]))
        raise RateLimited(
            f"too many {what}; try again in {retry_after} s", retry_after_s=retry_after
        )

    def _hold(self, name: tuple[str, tuple[str, ...]], allowance: _Allowance) -> None:
        allowances = self._allowances
        if len(allowances) >= MAX_ALLOWANCES and name not in allowances:
            now = time.monotonic()
            for lapsed in [k for k, a in allowances.items() if a.until <= now]:
                del allowances[lapsed]
            while len(allowances) >= MAX_ALLOWANCES:
                del allowances[next(iter(allowances))]
        allowances[name] = allowance

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
