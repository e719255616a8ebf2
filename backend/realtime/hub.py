"""The API process's fan-out: one Redis pub/sub connection for every follower.

A *feed* per followed execution knows the last seq it passed on; each follower has a
bounded queue, so a slow client only ever fills its own (and is told to resume when it
falls too far behind) while the others carry on. Nothing is lost between the pieces:

- a follower first catches up from the stream (the replay log) up to the feed's seq,
  then joins the feed, with no await in between;
- a message whose seq skips ahead makes the feed read the gap from the stream first;
- a poll of the feeds' counters every `poll_s` catches anything pub/sub dropped (a
  reconnect, a slow subscriber buffer), so the last event always arrives.

Workspace channels (`ws:<id>`) carry best-effort notices (workflow edits, members,
execution status for live counters) with no seq: their followers refetch on a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.kit.logging import get_logger
from backend.realtime.events import EventLog, channel, seq_key, seq_of, workspace_channel

log = get_logger(__name__)


class Lagging(Exception):
    """The follower's queue is full: it must reconnect and resume from its last seq."""


@dataclass(eq=False)
class Follower:
    """One client's view of one execution's events (or of a workspace channel)."""

    queue: asyncio.Queue[str]
    last: int = 0
    lagging: asyncio.Event = field(default_factory=asyncio.Event)
    # Set for a multiplexed socket: wraps each event with its channel name, or filters
    # it out (None).
    wrap: Callable[[str], str | None] | None = None

    def offer(self, seq: int, text: str) -> None:
        if seq <= self.last or self.lagging.is_set():
            return
        out = self.wrap(text) if self.wrap else text
        if out is not None:
            try:
                self.queue.put_nowait(out)
            except asyncio.QueueFull:
                self.lagging.set()
                return
        self.last = seq


@dataclass(eq=False)
class Feed:
    execution_id: uuid.UUID
    last: int = 0
    followers: set[Follower] = field(default_factory=set)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Set once `last` holds the counter as of the subscription.
    ready: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)
class Notices:
    followers: set[Follower] = field(default_factory=set)


class Hub:
    def __init__(
        self, redis: Redis, engine: AsyncEngine, *, poll_s: float = 1.0, queue_size: int = 1000
    ) -> None:
        self.redis = redis
        self.engine = engine
        self.log = EventLog(redis)
        self.poll_s = poll_s
        self.queue_size = queue_size
        self.feeds: dict[uuid.UUID, Feed] = {}
        self.notices: dict[str, Notices] = {}
        self._pubsub: PubSub | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()
        self._stopping = False

    # Lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._read_forever(), name="hub.read"),
            asyncio.create_task(self._poll_forever(), name="hub.poll"),
        ]

    async def stop(self) -> None:
        # redis-py's get_message can swallow a cancel while it waits on the socket:
        # closing the connection under it is what reliably ends the read.
        self._stopping = True
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        for task in self._tasks:
            task.cancel()
        await asyncio.wait(self._tasks, timeout=2)

    def follower(self, wrap: Callable[[str], str | None] | None = None) -> Follower:
        return Follower(asyncio.Queue(self.queue_size), wrap=wrap)

    # Execution feeds -------------------------------------------------------------------------

    async def last_seq(self, execution_id: uuid.UUID) -> int:
        """The newest seq: Redis's counter, or the archive's once the keys expired."""
        return await self.log.last_seq(execution_id) or await self.log.archived_seq(
            self.engine, execution_id
        )

    async def follow(self, execution_id: uuid.UUID, follower: Follower) -> list[str]:
        """Join the live feed after `follower.last`. Returns the backlog (the events
        between `follower.last` and where the feed stood on joining), which the caller
        sends before anything the follower's queue receives. The backlog is read mostly
        without the feed's lock, so a client catching up a long way never holds up the
        reader, and it does not count against the follower's queue."""
        while True:
            feed = self.feeds.get(execution_id)
            if feed is None:
                feed = self.feeds[execution_id] = Feed(execution_id)
                try:
                    await self._subscribe(channel(execution_id))
                    # After subscribing: anything published from now on reaches the
                    # reader, anything before is in the log.
                    feed.last = max(feed.last, await self.last_seq(execution_id))
                finally:
                    feed.ready.set()
            # Followers that arrive while the feed is being set up wait for its seq:
            # joining at 0 would skip what came before it.
            await feed.ready.wait()
            after = follower.last
            backlog: list[str] = []
            if after < feed.last:
                backlog = await self.log.read(execution_id, after, feed.last, engine=self.engine)
            async with feed.lock:
                if self.feeds.get(execution_id) is not feed:
                    continue  # it was torn down meanwhile: start over with a new one
                upto = seq_of(backlog[-1]) if backlog else after
                if upto < feed.last:
                    # What arrived while reading: a few events at most.
                    backlog += await self.log.read(
                        execution_id, upto, feed.last, engine=self.engine
                    )
                if self.feeds.get(execution_id) is not feed:
                    continue  # torn down while we read: joining it would hear nothing
                # No await from the check to here: nobody can tear it down in between.
                follower.last = max(after, feed.last)
                feed.followers.add(follower)
                return backlog

    async def unfollow(self, execution_id: uuid.UUID, follower: Follower) -> None:
        feed = self.feeds.get(execution_id)
        if feed is None:
            return
        if follower not in feed.followers:
            return  # it never joined (refused, or gone before): not its feed to end
        feed.followers.discard(follower)
        # Torn down even while a gap read holds the lock: that read then delivers to
        # nobody, and a follower joining meanwhile notices and builds a new feed.
        if not feed.followers and feed.ready.is_set():
            del self.feeds[execution_id]
            await self._unsubscribe(channel(execution_id))

    async def _deliver(self, feed: Feed, seq: int, text: str | None) -> None:
        if seq <= feed.last:
            return
        async with feed.lock:
            if seq <= feed.last:
                return
            if text is None or seq > feed.last + 1:
                # A gap (or a poll found news): read it from the log, in order.
                events = await self.log.read(feed.execution_id, feed.last, seq, engine=self.engine)
            else:
                events = [text]
            for item in events:
                item_seq = seq_of(item)
                if item_seq <= feed.last:
                    continue
                for follower in list(feed.followers):
                    follower.offer(item_seq, item)
                feed.last = item_seq

    # Workspace notices -----------------------------------------------------------------------

    async def listen(self, workspace_id: uuid.UUID, follower: Follower) -> None:
        name = workspace_channel(workspace_id)
        notices = self.notices.get(name)
        if notices is None:
            notices = self.notices[name] = Notices()
            await self._subscribe(name)
        notices.followers.add(follower)

    async def unlisten(self, workspace_id: uuid.UUID, follower: Follower) -> None:
        name = workspace_channel(workspace_id)
        notices = self.notices.get(name)
        if notices is None:
            return
        notices.followers.discard(follower)
        if not notices.followers:
            del self.notices[name]
            await self._unsubscribe(name)

    # Redis -------------------------------------------------------------------------------------

    async def _subscribe(self, name: str) -> None:
        await self._ready.wait()
        assert self._pubsub is not None
        await self._pubsub.subscribe(name)

    async def _unsubscribe(self, name: str) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.unsubscribe(name)

    async def _read_forever(self) -> None:
        while not self._stopping:
            pubsub = self._pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                # Resubscribe after a reconnect; the poll fills whatever was missed.
                names = [channel(e) for e in self.feeds] + list(self.notices)
                await pubsub.subscribe("hub:alive", *names)
                self._ready.set()
                while not self._stopping:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    try:
                        await self._dispatch(message["channel"], message["data"])
                    except Exception:
                        # One feed's trouble (a failed gap read) is not everyone's:
                        # the poll retries it.
                        log.exception("hub.dispatch_failed")
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._stopping:
                    return
                log.exception("hub.read_failed")
                self._ready.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                await asyncio.sleep(0.5)

    async def _dispatch(self, raw_channel: bytes | str, data: bytes | str) -> None:
        name = raw_channel.decode() if isinstance(raw_channel, bytes) else raw_channel
        text = data.decode() if isinstance(data, bytes) else data
        if name.startswith("ev:"):
            feed = self.feeds.get(uuid.UUID(name[3:]))
            if feed is not None:
                await self._deliver(feed, seq_of(text), text)
        elif name.startswith("ws:"):
            notices = self.notices.get(name)
            for follower in list(notices.followers if notices else ()):
                follower.offer(follower.last + 1, text)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll()
            except Exception:
                log.exception("hub.poll_failed")

    async def poll(self) -> None:
        feeds = list(self.feeds.values())
        if not feeds:
            return
        values: list[Any] = await self.redis.mget([seq_key(feed.execution_id) for feed in feeds])
        for feed, value in zip(feeds, values, strict=True):
            if value is not None and int(value) > feed.last:
                await self._deliver(feed, int(value), None)
