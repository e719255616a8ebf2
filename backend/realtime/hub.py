"""The API process's fan-out: one Redis pub/sub connection for every follower.

A *feed* per followed execution knows the last seq it passed on; each follower has a
bounded queue, so a slow client only ever fills its own (and is told to resume when it
falls too far behind) while the others carry on. Nothing is lost between the pieces:

- a follower first catches up from the stream (the replay log) up to the feed's seq,
  then joins the feed, with no await in between;
- a message whose seq skips ahead makes the feed read the gap from the stream first;
- a poll of the feeds' counters every `poll_s` catches anything pub/sub dropped (a
  reconnect, a slow subscriber buffer), so the last event always arrives;
- a feed that heard nothing for `quiet_s` is checked against PostgreSQL: a run that
  ended there whose log has no terminal event (Redis was down when it was published)
  gets one from its row, so a follower always reaches the end.

Workspace channels (`ws:<id>`) carry best-effort notices (workflow edits, members,
execution status for live counters) with no seq: their followers refetch on a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from backend.executions.state import TERMINAL_EXECUTION
from backend.kit.logging import get_logger
from backend.models import WorkflowExecution
from backend.realtime.events import (
    EventLog,
    channel,
    is_terminal,
    seq_key,
    seq_of,
    status_event,
    with_seq,
    workspace_channel,
)

log = get_logger(__name__)
# A followed run that sent nothing for this long is checked against PostgreSQL: if it
# ended there, its followers get the end even when the log never got it.
QUIET_S = 5.0
SUBSCRIBE_TIMEOUT_S = 10.0


class Lagging(Exception):
    """The follower's queue is full: it must reconnect and resume from its last seq."""


class Inbox:
    """What one connection has to send, in order, bounded. Its sender takes everything
    queued at once and is woken once per burst, not once per message: at a thousand
    sockets, a wake-up, a queue hand-off and a timer per message was most of the cost
    of fanning an event out."""

    __slots__ = ("_waiter", "items", "lagging", "limit")

    def __init__(self, limit: int) -> None:
        self.items: deque[str] = deque()
        self.limit = limit
        # Set once it overflowed: the client must reconnect and resume (4408).
        self.lagging = False
        self._waiter: asyncio.Future[None] | None = None

    def put(self, text: str) -> bool:
        if len(self.items) >= self.limit:
            self.lagging = True
            self.wake()
            return False
        self.items.append(text)
        self.wake()
        return True

    def take(self) -> list[str]:
        items = list(self.items)
        self.items.clear()
        return items

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until something is queued, the inbox overflowed or `wake()` was called."""
        if self.items or self.lagging:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


@dataclass(eq=False)
class Follower:
    """One client's view of one execution's events (or of a workspace channel)."""

    inbox: Inbox
    last: int = 0
    # Set for a multiplexed socket: wraps each event with its channel name, or filters
    # it out (None).
    wrap: Callable[[str], str | None] | None = None

    def offer(self, seq: int, text: str) -> None:
        if seq <= self.last or self.inbox.lagging:
            return
        out = self.wrap(text) if self.wrap else text
        if out is not None and not self.inbox.put(out):
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
    # The run's terminal event went out to the followers.
    ended: bool = False
    # When the feed last passed an event on, or was last checked against the database.
    heard: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class Notices:
    followers: set[Follower] = field(default_factory=set)


class Hub:
    def __init__(
        self,
        redis: Redis,
        engine: AsyncEngine,
        *,
        poll_s: float = 1.0,
        queue_size: int = 1000,
        quiet_s: float = QUIET_S,
    ) -> None:
        self.redis = redis
        self.engine = engine
        self.log = EventLog(redis)
        self.poll_s = poll_s
        self.queue_size = queue_size
        self.quiet_s = quiet_s
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
        return Follower(Inbox(self.queue_size), wrap=wrap)

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
                except BaseException:
                    # Redis away: no half-made feed stays behind for others to join.
                    if self.feeds.get(execution_id) is feed:
                        del self.feeds[execution_id]
                    raise
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
                feed.ended = feed.ended or is_terminal(item)
            feed.heard = time.monotonic()

    # The committed state, when the log has no end ---------------------------------------------

    async def end_seq(self, execution_id: uuid.UUID) -> int | None:
        return await self.log.end_seq(execution_id, self.engine)

    async def settle(self, execution_id: uuid.UUID, floor: int = 0) -> str | None:
        """If the run ended in PostgreSQL but its log has no terminal event (Redis was
        down when it was published and the worker that kept it is gone, or it is still
        on its way), append one built from the execution row, so every follower and
        every later resume reaches the end. Returns that event (without seq) when the
        run is terminal, else None. Safe against the real one arriving too: a run's
        log takes one terminal event, the first (the end mark)."""
        execution = await self._execution(execution_id)
        if execution is None or execution.status not in TERMINAL_EXECUTION:
            return None
        text = status_event(execution)
        if await self.end_seq(execution_id) is None:
            floor = max(floor, await self.log.archived_seq(self.engine, execution_id))
            await self.log.publish(
                execution_id, execution.workspace_id, [text], final=True, floor=floor
            )
            log.info("events.end_restored", execution_id=str(execution_id))
        return text

    async def _execution(self, execution_id: uuid.UUID) -> WorkflowExecution | None:
        async with AsyncSession(self.engine, expire_on_commit=False) as session:
            return await session.get(WorkflowExecution, execution_id)

    async def check_quiet(self) -> None:
        """Feeds that heard nothing for `quiet_s`: if their run ended in PostgreSQL, the
        log's end is restored (`settle`) and passed on; if Redis does not answer, the
        followers get the terminal status straight from the row and the stream ends.
        One query for all of them, each feed at most once per `quiet_s`."""
        now = time.monotonic()
        quiet = [
            f
            for f in self.feeds.values()
            if not f.ended and f.ready.is_set() and now - f.heard >= self.quiet_s
        ]
        if not quiet:
            return
        for feed in quiet:
            feed.heard = now
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(WorkflowExecution.id).where(
                    WorkflowExecution.id.in_([f.execution_id for f in quiet]),
                    WorkflowExecution.status.in_(list(TERMINAL_EXECUTION)),
                )
            )
            ended = {row[0] for row in rows}
        for feed in quiet:
            if feed.execution_id in ended:
                await self._end(feed)

    async def _end(self, feed: Feed) -> None:
        text: str | None = None
        try:
            text = await self.settle(feed.execution_id, floor=feed.last)
            if text is not None:
                await self._deliver(feed, await self.log.last_seq(feed.execution_id), None)
        except Exception as exc:
            log.warning("hub.settle_failed", execution_id=str(feed.execution_id), error=repr(exc))
        if feed.ended:
            return
        # Redis is away (or lost what it held): the committed state is the end.
        if text is None:
            execution = await self._execution(feed.execution_id)
            if execution is None:
                return
            text = status_event(execution)
        async with feed.lock:
            if feed.ended:
                return
            seq = feed.last + 1
            for follower in list(feed.followers):
                follower.offer(seq, with_seq(text, seq))
            feed.ended = True
            log.warning("hub.end_from_database", execution_id=str(feed.execution_id))

    # Workspace notices -----------------------------------------------------------------------

    async def listen(self, workspace_id: uuid.UUID, follower: Follower) -> None:
        await self.listen_channel(workspace_channel(workspace_id), follower)

    async def listen_channel(self, name: str, follower: Follower) -> None:
        """Notices of one Redis channel (`ws:<workspace>`, or `usr:<user>`: a person's
        own notices, tasks and notifications)."""
        notices = self.notices.get(name)
        if notices is None:
            notices = self.notices[name] = Notices()
            await self._subscribe(name)
        notices.followers.add(follower)

    async def unlisten(self, workspace_id: uuid.UUID, follower: Follower) -> None:
        await self.unlisten_channel(workspace_channel(workspace_id), follower)

    async def unlisten_channel(self, name: str, follower: Follower) -> None:
        notices = self.notices.get(name)
        if notices is None:
            return
        notices.followers.discard(follower)
        if not notices.followers:
            del self.notices[name]
            await self._unsubscribe(name)

    # Redis -------------------------------------------------------------------------------------

    async def _subscribe(self, name: str) -> None:
        # While Redis is away the reader cannot subscribe: fail (TimeoutError is an
        # OSError) rather than hold the client forever.
        async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):
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
        elif name.startswith(("ws:", "usr:")):
            notices = self.notices.get(name)
            for follower in list(notices.followers if notices else ()):
                follower.offer(follower.last + 1, text)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                # Bounded: this client has no read timeout (pub/sub shares it), and a
                # Redis that stopped answering must not stop the quiet check below.
                async with asyncio.timeout(max(2.0, 2 * self.poll_s)):
                    await self.poll()
            except Exception as exc:
                log.warning("hub.poll_failed", error=repr(exc))
            try:
                await self.check_quiet()
            except Exception:
                log.exception("hub.check_quiet_failed")

    async def poll(self) -> None:
        feeds = list(self.feeds.values())
        if not feeds:
            return
        values: list[Any] = await self.redis.mget([seq_key(feed.execution_id) for feed in feeds])
        for feed, value in zip(feeds, values, strict=True):
            if value is not None and int(value) > feed.last:
                await self._deliver(feed, int(value), None)
