"""The process's Watch keeps every live-progress socket's timers in one task: pings on
an idle stream, the end of a socket's lifetime, and the send limit for a client that
stopped reading (4408). Driven through `_pump` with a stand-in for Starlette's
WebSocket (the timing is ours; the real socket path is in test_streams)."""

from __future__ import annotations

import asyncio
import itertools
import time
import types
from typing import Any

import pytest

from backend.config import Settings, get_settings
from backend.realtime import router
from backend.realtime.hub import Follower, Inbox, Lagging


class Socket:
    """What `_pump` uses of a WebSocket: send_text, receive_text and app.state."""

    def __init__(self, settings: Settings, *, stall: bool = False) -> None:
        self.app = types.SimpleNamespace(state=types.SimpleNamespace(settings=settings))
        self.sent: list[tuple[float, str]] = []
        self.stall = stall

    async def send_text(self, text: str) -> None:
        if self.stall:  # a client that stopped reading: the send never completes
            await asyncio.get_running_loop().create_future()
        self.sent.append((time.monotonic(), text))

    async def receive_text(self) -> str:
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")


def settings(**realtime: Any) -> Settings:
    base = get_settings()
    return base.model_copy(update={"realtime": base.realtime.model_copy(update=realtime)})


async def test_an_idle_stream_is_pinged_every_heartbeat_and_closed_at_its_lifetime() -> None:
    s = settings(heartbeat_s=0.2, send_timeout_s=5.0, max_connection_s=1.0)
    ws: Any = Socket(s)
    started = time.monotonic()
    code = await router._pump(
        ws, Follower(Inbox(10)), s, (started + 1.0, router.CLOSE_LIFETIME), router.ends_run
    )
    took = time.monotonic() - started
    assert code == router.CLOSE_LIFETIME
    assert 1.0 <= took < 1.6
    pings = [at - started for at, text in ws.sent if text == router.PING]
    assert 3 <= len(pings) <= 5
    assert all(b - a >= 0.15 for a, b in itertools.pairwise(pings))


async def test_events_go_out_at_once_without_waiting_for_a_tick() -> None:
    s = settings(heartbeat_s=20.0, send_timeout_s=5.0, max_connection_s=60.0)
    ws: Any = Socket(s)
    follower = Follower(Inbox(10))
    pump = asyncio.create_task(
        router._pump(ws, follower, s, (time.monotonic() + 60, 4000), router.ends_run, True)
    )
    await asyncio.sleep(0.05)
    offered = time.monotonic()
    follower.offer(1, '{"seq":1,"type":"node.status","status":"running"}')
    follower.offer(2, '{"seq":2,"type":"execution.status","status":"completed"}')
    assert await asyncio.wait_for(pump, 2) == 1000
    (at, frame), *_ = ws.sent
    assert frame.startswith("[") and '"seq":2' in frame  # one batched frame
    assert at - offered < 0.05


async def test_a_client_that_stops_reading_is_stopped_at_the_send_limit() -> None:
    s = settings(heartbeat_s=20.0, send_timeout_s=0.4, max_connection_s=60.0)
    ws: Any = Socket(s, stall=True)
    follower = Follower(Inbox(10))
    follower.offer(1, '{"seq":1,"type":"node.status","status":"running"}')
    started = time.monotonic()
    with pytest.raises(Lagging):
        await router._pump(ws, follower, s, (started + 60, 4000), router.ends_run)
    assert 0.4 <= time.monotonic() - started < 1.2
    # The Watch's cancel was its own: the task is not left cancelling.
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_a_cancel_from_elsewhere_still_cancels_a_send() -> None:
    s = settings(heartbeat_s=20.0, send_timeout_s=30.0, max_connection_s=60.0)
    ws: Any = Socket(s, stall=True)
    follower = Follower(Inbox(10))
    follower.offer(1, '{"seq":1,"type":"node.status","status":"running"}')
    pump = asyncio.create_task(
        router._pump(ws, follower, s, (time.monotonic() + 60, 4000), router.ends_run)
    )
    await asyncio.sleep(0.1)
    pump.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pump
