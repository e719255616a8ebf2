"""The capacity budgets' own hot path (backend/kit/ratelimit.py): one EVALSHA on the
library's keys, refusing with the library's Retry-After, pipelined on a connection of
its own (backend/kit/ratelimit_wire.py), against the real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from urllib.parse import urlsplit

import pytest
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from backend.config import Settings
from backend.kit.errors import DependencyUnavailable, RateLimited
from backend.kit.ratelimit import RateLimiter, parse, sliding_retry_after
from backend.kit.ratelimit_wire import _MORE, Wire, pack
from backend.kit.ratelimit_wire import parse as parse_reply
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
        assert await redis.script_exists(limiter._sliding_sha) == [True]
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


# The hot path's own connection (backend/kit/ratelimit_wire.py).


def test_the_wire_speaks_plain_redis_urls_only() -> None:
    def wire(url: str) -> Wire | None:
        return Wire.for_url(url, timeout_s=1, connect_timeout_s=1)

    assert wire("redis://127.0.0.1:6380/2") is not None
    assert wire("redis://:secret@cache.internal") is not None
    assert wire("redis://user:p%40ss@cache.internal:6379/0") is not None
    # TLS, a socket file, options: redis-py's client instead.
    for other in (
        "rediss://cache.internal:6380/0",
        "unix:///run/redis.sock?db=1",
        "redis://127.0.0.1:6379/0?socket_keepalive=true",
        "redis://127.0.0.1:6379/notadb",
    ):
        assert wire(other) is None, other


def test_replies_split_anywhere_are_waited_for() -> None:
    whole = b"*5\r\n:0\r\n:3\r\n:41250\r\n$2\r\nab\r\n*-1\r\n"
    assert parse_reply(whole, 0) == ([0, 3, 41250, b"ab", None], len(whole))
    for cut in range(1, len(whole)):
        value, pos = parse_reply(whole[:cut], 0)
        assert (value, pos) == (_MORE, 0), cut
    error, _ = parse_reply(b"-NOSCRIPT No matching script\r\n", 0)
    assert isinstance(error, NoScriptError)
    assert pack("EVALSHA", "ab", 2, b"k") == (
        b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n2\r\n$1\r\nk\r\n"
    )


async def test_concurrent_hits_on_one_connection_count_exactly(settings: Settings) -> None:
    limiter = RateLimiter(settings.redis_url)
    assert limiter._wire is not None  # the test Redis has a plain URL
    bucket = _bucket()
    results = await asyncio.gather(
        *(limiter.hit("50 per minute", "api", bucket) for _ in range(60)), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, RateLimited)]
    assert len(refused) == 10 and results.count(None) == 50


async def test_the_wire_signs_in_and_picks_the_database(settings: Settings) -> None:
    admin = Redis.from_url(settings.redis_url)
    user, password = f"h25-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await admin.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], keys=["*"], commands=["+@all"]
    )
    parts = urlsplit(settings.redis_url)
    try:
        url = f"redis://{user}:{password}@{parts.hostname}:{parts.port}/7"
        limiter = RateLimiter(url)
        assert limiter._wire is not None
        bucket = _bucket()
        await limiter.hit("1 per minute", "api", bucket)
        with pytest.raises(RateLimited):
            await limiter.hit("1 per minute", "api", bucket)
        # The count is in database 7, where the library (check) reads it too.
        seven = Redis(host=parts.hostname or "", port=parts.port or 6379, db=7)
        try:
            assert await seven.keys(f"orch-rl:{{LIMITER/api/{bucket}/*")
        finally:
            await seven.aclose()
        with pytest.raises(RateLimited):
            await limiter.check("1 per minute", "api", bucket)
        # A wrong password is Redis unavailable: the capacity budget fails open.
        wrong = RateLimiter(f"redis://{user}:nope@{parts.hostname}:{parts.port}/7")
        await wrong.hit("1 per minute", "api", bucket)
    finally:
        await admin.acl_deluser(user)
        await admin.aclose()


async def test_a_redis_that_never_answers_times_out() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads nothing, answers nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        limiter = RateLimiter(f"redis://127.0.0.1:{port}/0", timeout_s=0.3)
        started = time.monotonic()
        await limiter.hit("1 per minute", "api", _bucket())  # fails open
        with pytest.raises(DependencyUnavailable):
            await limiter.hit("1 per minute", "otp-request-ip", "127.0.0.0/24")
        assert time.monotonic() - started < 3
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_url_the_wire_does_not_speak_goes_through_redis_py(settings: Settings) -> None:
    limiter = RateLimiter(settings.redis_url.split("?")[0] + "?socket_keepalive=true")
    assert limiter._wire is None
    bucket = _bucket()
    await limiter.hit("1 per minute", "api", bucket)
    with pytest.raises(RateLimited):
        await limiter.hit("1 per minute", "api", bucket)


def test_the_wire_runs_on_uvloop(settings: Settings) -> None:
    # uvicorn runs the API on uvloop, whose transports are not asyncio.Transport
    # subclasses; the suite's own loop is asyncio's.
    import uvloop

    async def hits() -> None:
        limiter = RateLimiter(settings.redis_url)
        assert limiter._wire is not None
        bucket = _bucket()
        await asyncio.gather(*(limiter.hit("3 per minute", "api", bucket) for _ in range(3)))
        with pytest.raises(RateLimited):
            await limiter.hit("3 per minute", "api", bucket)
        assert limiter._wire is not None
        limiter._wire.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(hits())
