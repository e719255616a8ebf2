"""The capacity budgets' own hot path (backend/kit/ratelimit.py): one EVALSHA on the
library's keys, refusing with the library's Retry-After, against the real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from redis.asyncio import Redis

from backend.config import Settings
from backend.kit.errors import DependencyUnavailable, RateLimited
from backend.kit.ratelimit import (
    ALLOWANCE_S,
    KEY_PREFIX,
    RateLimiter,
    parse,
    sliding_retry_after,
)
from tests.support.procs import free_port


def _bucket() -> str:
    return f"user:{uuid.uuid4()}"


async def test_a_capacity_budget_counts_in_the_librarys_window(settings: Settings) -> None:
    limiter = RateLimiter(settings.redis_url)
    library = SlidingWindowCounterRateLimiter(limiter._storage)
    bucket = _bucket()
    for _ in range(3):
        await limiter.hit("3 per minute", "api", bucket)
    # The library reads the same two keys: the budget is spent for it too, and its
    # check (what `check` uses) refuses.
    assert not await library.test(parse("3 per minute"), "api", bucket)
    with pytest.raises(RateLimited) as refused:
        await limiter.hit("3 per minute", "api", bucket)
    assert refused.value.code == "rate_limited"
    assert 1 <= refused.value.retry_after_s <= 61
    assert "too many requests" in refused.value.detail
    # The refusal spent nothing: the library still counts 3.
    stats = await library.get_window_stats(parse("3 per minute"), "api", bucket)
    assert stats.remaining == 0
    with pytest.raises(RateLimited):
        await limiter.check("3 per minute", "api", bucket)
    # Another principal has its own budget.
    await limiter.hit("3 per minute", "api", _bucket())


async def test_what_the_library_spent_counts_on_the_hot_path(settings: Settings) -> None:
    limiter = RateLimiter(settings.redis_url)
    bucket = _bucket()
    await limiter.spend("2 per minute", "hook", bucket)
    await limiter.hit("2 per minute", "hook", bucket, what="deliveries")
    with pytest.raises(RateLimited) as refused:
        await limiter.hit("2 per minute", "hook", bucket, what="deliveries")
    assert "too many deliveries" in refused.value.detail


async def test_the_retry_after_is_the_librarys(settings: Settings) -> None:
    limiter = RateLimiter(settings.redis_url)
    library = SlidingWindowCounterRateLimiter(limiter._storage)
    bucket = _bucket()
    item = parse("5 per 10 seconds")
    for _ in range(5):
        await limiter.hit("5 per 10 seconds", "api", bucket)
    # Off the window's first millisecond: there the key's TTL is exactly twice the
    # window, the library's modulo gives 0 s (Retry-After 1) and a read a moment later
    # the whole window; both formulas are the library's, read at different instants.
    await asyncio.sleep(0.05)
    with pytest.raises(RateLimited) as refused:
        await limiter.hit("5 per 10 seconds", "api", bucket)
    stats = await library.get_window_stats(item, "api", bucket)
    expected = max(1, int(stats.reset_time - time.time()) + 1)
    assert abs(refused.value.retry_after_s - expected) <= 1
    assert 1 <= refused.value.retry_after_s <= 11


def test_retry_after_arithmetic() -> None:
    # Nothing counted (a limit of 0): try again in a second.
    assert sliding_retry_after(60, 0, 0, 0, 0) == 1
    # Only the current window: its end, rounded up.
    assert sliding_retry_after(60, 0, 0, 3, 90_500) == 31  # 90.5 % 60 = 30.5
    # The previous window's next unit leaves sooner: 50 s left over 10 counted, one
    # weighted unit every 6 s, the next in 50 % 6 = 2 s.
    assert sliding_retry_after(60, 10, 50_000, 3, 90_500) == 3


async def test_a_script_flushed_from_redis_is_sent_again(settings: Settings) -> None:
    limiter = RateLimiter(settings.redis_url)
    bucket = _bucket()
    redis = Redis.from_url(settings.redis_url)
    try:
        await redis.script_flush()
        await limiter.hit("2 per minute", "api", bucket)
        assert await redis.script_exists(limiter._sliding_hit.sha) == [True]
        await limiter.hit("2 per minute", "api", bucket)
        with pytest.raises(RateLimited):
            await limiter.hit("2 per minute", "api", bucket)
    finally:
        await redis.aclose()


async def test_with_redis_down_capacity_fails_open_and_guards_fail_closed() -> None:
    limiter = RateLimiter(
        f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5, connect_timeout_s=0.5
    )
    await limiter.hit("1 per minute", "api", _bucket())
    await limiter.hit("1 per minute", "api", _bucket())
    await limiter.hit("1 per minute", "hook", "abc")
    with pytest.raises(DependencyUnavailable):
        await limiter.hit("1 per minute", "otp-request-ip", "127.0.0.0/24")


async def _counted(limiter: RateLimiter, limit: str, *key: str) -> int:
    """What Redis counts in the key's current window."""
    current = f"{KEY_PREFIX}:{{{parse(limit).key_for(*key)}}}"
    return int(await limiter._redis.get(current) or 0)


async def test_a_busy_caller_takes_its_units_in_batches(settings: Settings) -> None:
    """One script call per batch: the 2nd hit within ALLOWANCE_S takes 2 units, the 4th
    takes 4, and the hits in between spend what the process holds."""
    limiter = RateLimiter(settings.redis_url)
    bucket = _bucket()
    limit = "1000 per minute"
    counted = []
    for _ in range(7):
        await limiter.hit(limit, "api", bucket)
        counted.append(await _counted(limiter, limit, "api", bucket))
    assert counted == [1, 3, 3, 7, 7, 7, 7]
    # Small limits are counted one by one (a batch is at most a fiftieth of the limit).
    small = _bucket()
    for i in range(1, 5):
        await limiter.hit("60 per minute", "api", small)
        assert await _counted(limiter, "60 per minute", "api", small) == i


async def test_held_units_lapse_and_a_slower_caller_takes_one_at_a_time(
    settings: Settings,
) -> None:
    limiter = RateLimiter(settings.redis_url)
    bucket = _bucket()
    limit = "1000 per minute"
    await limiter.hit(limit, "api", bucket)
    await limiter.hit(limit, "api", bucket)  # takes 2, holds 1
    assert await _counted(limiter, limit, "api", bucket) == 3
    await asyncio.sleep(ALLOWANCE_S + 0.2)
    # The held unit lapsed: it goes back to the window with the next take, which is one
    # unit (the caller slowed down).
    await limiter.hit(limit, "api", bucket)
    assert await _counted(limiter, limit, "api", bucket) == 3


async def test_bursts_waste_nothing_of_the_budget(settings: Settings) -> None:
    """A burst takes growing batches (1+2+4+8+16 units for 16 requests); what it did not
    spend goes back with the next burst's first take, so bursts a while apart spend what
    they use (they used to lose the rest: refused after ~half the limit)."""
    limiter = RateLimiter(settings.redis_url)
    bucket = _bucket()
    limit = "1000 per minute"
    for _ in range(16):
        await limiter.hit(limit, "api", bucket)
    assert await _counted(limiter, limit, "api", bucket) == 31
    await asyncio.sleep(ALLOWANCE_S + 0.2)
    await limiter.hit(limit, "api", bucket)
    assert await _counted(limiter, limit, "api", bucket) == 17


async def test_concurrent_requests_of_one_caller_take_one_batch_at_a_time(
    settings: Settings,
) -> None:
    """Requests of one caller in flight together: one takes a batch, the others spend
    from it (they do not each take one and throw the others' away)."""
    limiter = RateLimiter(settings.redis_url)
    bucket = _bucket()
    limit = "1000 per minute"
    for _ in range(16):  # a busy caller: batches of 16 from now on
        await limiter.hit(limit, "api", bucket)
    used = 16
    for _ in range(3):
        await asyncio.gather(*(limiter.hit(limit, "api", bucket) for _ in range(50)))
        used += 50
        # Counted: what was spent, plus at most one batch held.
        assert used <= await _counted(limiter, limit, "api", bucket) <= used + 15


async def test_batches_across_processes_never_admit_more_than_the_limit(
    settings: Settings,
) -> None:
    """Two API processes (two limiters) spending one budget: together they are admitted
    at most the limit, and refused at most (batch - 1) per process early."""
    processes = [RateLimiter(settings.redis_url) for _ in range(2)]
    bucket = _bucket()
    limit = "200 per minute"  # batches of up to 4
    admitted = 0
    refused = [False, False]
    while not all(refused):
        for i, limiter in enumerate(processes):
            if refused[i]:
                continue
            try:
                await limiter.hit(limit, "api", bucket)
                admitted += 1
            except RateLimited:
                refused[i] = True
    assert 200 - 2 * 3 <= admitted <= 200
    assert await _counted(processes[0], limit, "api", bucket) <= 200


async def test_requests_waiting_on_a_silent_redis_share_its_timeout() -> None:
    """Redis accepts connections and never answers: the requests of one caller in flight
    together fail open together, after one timeout, not one timeout after another."""
    held: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        limiter = RateLimiter(f"redis://127.0.0.1:{port}/0", timeout_s=0.3, connect_timeout_s=0.3)
        for limit in ("1000 per minute", "10 per minute"):  # batched, and one by one
            bucket = _bucket()
            started = time.monotonic()
            await asyncio.gather(*(limiter.hit(limit, "api", bucket) for _ in range(10)))
            # One after another this was 10 x 0.3 s.
            assert time.monotonic() - started < 2.0, limit
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_units_given_back_by_a_call_whose_answer_was_lost_are_not_given_back_again(
    settings: Settings,
) -> None:
    """The script ran (it gave back a lapsed batch's 15 units and took one) but its answer
    never came (a timeout): the next take must not give the 15 back a second time, which
    would take units other processes counted."""
    url = settings.redis_url
    target = Redis.from_url(url)
    host, port = (
        target.connection_pool.connection_kwargs["host"],
        target.connection_pool.connection_kwargs["port"],
    )
    swallow = asyncio.Event()

    async def pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answers: bool
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if not (answers and swallow.is_set()):
                    writer.write(chunk)
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    pipes: list[asyncio.Task[None]] = []

    async def forward(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(host, port)
        pipes.append(asyncio.create_task(pipe(client_r, server_w, answers=False)))
        pipes.append(asyncio.create_task(pipe(server_r, client_w, answers=True)))

    proxy = await asyncio.start_server(forward, "127.0.0.1", 0)
    proxy_port = proxy.sockets[0].getsockname()[1]
    db = target.connection_pool.connection_kwargs.get("db", 0)
    limiter = RateLimiter(f"redis://127.0.0.1:{proxy_port}/{db}", timeout_s=0.3)
    bucket = _bucket()
    limit = "1000 per minute"
    try:
        for _ in range(16):
            await limiter.hit(limit, "api", bucket)
        assert await _counted(limiter, limit, "api", bucket) == 31  # 15 held
        await asyncio.sleep(ALLOWANCE_S + 0.2)
        swallow.set()
        await limiter.hit(limit, "api", bucket)  # fails open after the timeout
        swallow.clear()
        assert await _counted(limiter, limit, "api", bucket) == 17  # it ran all the same
        await limiter.hit(limit, "api", bucket)
        assert await _counted(limiter, limit, "api", bucket) == 18
    finally:
        proxy.close()
        for task in pipes:
            task.cancel()
        await target.aclose()
