"""Live progress: WebSocket and Server-Sent Events.

- `WS /api/v1/ws/executions/{id}`: one execution. The credential (access token or API
  key) comes in the `Sec-WebSocket-Protocol` header as `bearer, <credential>` or in the
  first message; the first message (`{}` when the header carried the credential) may
  hold `resume_from`. Without it the client gets a snapshot, then every later event;
  with it, exactly the events after that seq. The socket closes after the terminal
  status.
- `GET /api/v1/executions/{id}/events`: the same as SSE (`id:` = seq, `Last-Event-ID`).
- `WS /api/v1/ws`: many channels on one socket (`executions:<id>`, `workflows`,
  `workspace:<id>`, `analytics`, `user` / `user:<own id>`: the caller's tasks and
  notifications), with subscribe/unsubscribe messages.

Both sockets take `?batch=1`: whenever several messages are waiting for the client,
they go as ONE text frame holding a JSON array of them, in order (a single message
still goes as an object, as do pings). At a thousand sockets, a frame per event per
client was most of the fan-out's cost (a kernel write and a trip through the ASGI
stack each). Without it nothing changes: one object per frame.

Close codes: 4400 bad message, 4401 not authenticated or credential expired, 4403
forbidden, 4404 not found, 4429 rate limited, 4408 too slow (resume from your last
seq), 4000 maximum lifetime reached (reconnect and resume), 1013 Redis does not answer
and the run has not ended (reconnect later; a run that ended gets its end from its row).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError

from backend.analytics.live import counters
from backend.auth.dependencies import Principal, WorkspaceAccess, authenticate, grant, require
from backend.auth.permissions import Permission
from backend.config import Settings
from backend.executions import service
from backend.executions.schemas import ExecutionRead
from backend.executions.state import TERMINAL_EXECUTION
from backend.kit.errors import (
    DomainError,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
    ValidationFailed,
)
from backend.kit.logging import get_logger
from backend.models import WorkflowExecution
from backend.realtime.events import is_terminal, status_event, with_seq
from backend.realtime.hub import Follower, Hub, Inbox, Lagging

log = get_logger(__name__)
router = APIRouter(tags=["realtime"])
READ = Permission.WORKFLOWS_READ
CLOSE_BAD, CLOSE_AUTH, CLOSE_FORBIDDEN, CLOSE_NOT_FOUND, CLOSE_SLOW, CLOSE_LIFETIME = (
    4400,
    4401,
    4403,
    4404,
    4408,
    4000,
)
CLOSE_RATE_LIMITED = 4429
# Redis does not answer and the run has not ended: reconnect a little later.
CLOSE_TRY_AGAIN = 1013
PING = '{"type":"ping"}'
# At most this many messages in one batched frame (a long backlog goes as several).
BATCH_MAX = 500
# Whether a message is its run's last, asked of the same text by every follower of the
# run: each event is parsed once, not once per follower.
ends_run = functools.lru_cache(maxsize=256)(is_terminal)


async def _begin(
    app: Any, hub: Hub, execution_id: uuid.UUID, follower: Follower, resume_from: int | None
) -> tuple[list[str], bool]:
    """(what to send first, whether that is all): the snapshot or the events after
    `resume_from`, then the follower is on the live feed.

    A resume is over only when the client has the log's terminal event (its end mark,
    written in the same Redis call as the event). Deciding it from the counter and then
    the execution's status closed the socket without the end when the run finished
    between the two reads (its last event still on its way). A resume at the head of
    the log of a run that ended in PostgreSQL restores the log's end from the row if it
    has none (`Hub.settle`): it then arrives like any event."""
    if resume_from is None:
        seq = await hub.last_seq(execution_id)
        text = await snapshot(app, execution_id, seq)
        follower.last = seq
        # Finished before we came: the snapshot is the whole story, unless its last
        # event is still on its way (then it follows and ends the stream).
        if _finished_in(text) and await hub.last_seq(execution_id) <= seq:
            return [text], True
        first = [text]
    else:
        follower.last = resume_from
        first = []
        if resume_from >= await hub.last_seq(execution_id):
            end = await hub.end_seq(execution_id)
            if end is not None and resume_from >= end:
                return [], True
            await hub.settle(execution_id, floor=resume_from)
    return first + await hub.follow(execution_id, follower), False


async def _begin_or_row(
    app: Any, hub: Hub, execution_id: uuid.UUID, follower: Follower, resume_from: int | None
) -> tuple[list[str], bool] | None:
    """`_begin`, tried twice (the first command after Redis came back can meet a dead
    pooled connection); if Redis still does not answer, the run's end from its row when
    it ended (the stream is then over), or None: the client should retry later."""
    for attempt in range(2):
        try:
            return await _begin(app, hub, execution_id, follower, resume_from)
        except (RedisError, OSError) as exc:
            log.warning("realtime.redis_unavailable", error=repr(exc), attempt=attempt)
            follower.last = resume_from or 0
            await asyncio.sleep(0.1)
    end = await _end_from_row(app, execution_id, follower.last)
    return None if end is None else ([end], True)


async def _end_from_row(app: Any, execution_id: uuid.UUID, after: int) -> str | None:
    """Redis does not answer: a run that ended in PostgreSQL still ends its stream, with
    its terminal status built from the row. None while it runs (the client retries)."""
    async with app.state.sessionmaker() as session:
        execution = await session.get(WorkflowExecution, execution_id)
    if execution is None or execution.status not in TERMINAL_EXECUTION:
        return None
    return with_seq(status_event(execution), after + 1)


def _close_code(exc: Exception) -> int:
    if isinstance(exc, Unauthenticated):
        return CLOSE_AUTH
    if isinstance(exc, PermissionDenied):
        return CLOSE_FORBIDDEN
    if isinstance(exc, NotFound):
        return CLOSE_NOT_FOUND
    if isinstance(exc, RateLimited):
        return CLOSE_RATE_LIMITED
    return CLOSE_BAD


async def snapshot(request_app: Any, execution_id: uuid.UUID, seq: int) -> str:
    """The run's state as committed, as of event `seq` (read after `seq` was taken, so
    it reflects at least every event up to it)."""
    async with request_app.state.sessionmaker() as session:
        execution = await session.get(WorkflowExecution, execution_id)
        if execution is None:
            raise NotFound("execution not found")
        rows = await service.node_rows(session, execution_id)
    body = ExecutionRead.model_validate(execution).model_dump(mode="json")
    body.pop("nodes", None)
    nodes = [
        {
            "node_id": r.node_id,
            "iteration": r.iteration,
            "status": r.status,
            "attempt": r.attempt,
            "duration_ms": r.duration_ms,
            "error": r.error,
        }
        for r in rows
    ]
    return json.dumps(
        {"type": "snapshot", "seq": seq, "execution": body, "nodes": nodes},
        separators=(",", ":"),
        default=str,
    )


async def _principal(app: Any, credential: str | None) -> Principal:
    async with app.state.sessionmaker() as session:
        principal = await authenticate(session, app.state.settings, app.state.limiter, credential)
        await session.commit()
        return principal


async def _can_read_execution(
    app: Any, principal: Principal, execution_id: uuid.UUID
) -> WorkflowExecution:
    async with app.state.sessionmaker() as session:
        execution: WorkflowExecution | None = await session.get(WorkflowExecution, execution_id)
        if execution is None:
            raise NotFound("execution not found")
        await grant(session, principal, execution.workspace_id, READ, "execution not found")
        return execution


def _deadline(settings: Settings, principal: Principal) -> tuple[float, int]:
    """(monotonic time, close code) at which the connection ends: its maximum lifetime,
    or sooner when its credential expires."""
    end = time.monotonic() + settings.realtime.max_connection_s
    if principal.expires_at is not None:
        left = (principal.expires_at - datetime.now(UTC)).total_seconds()
        if time.monotonic() + left < end:
            return time.monotonic() + max(0.0, left), CLOSE_AUTH
    return end, CLOSE_LIFETIME


async def _hello(websocket: WebSocket, settings: Settings) -> tuple[str | None, dict[str, Any]]:
    """The credential from the subprotocol header, or the first message."""
    offered = websocket.scope.get("subprotocols") or []
    header_credential = offered[1] if len(offered) >= 2 and offered[0] == "bearer" else None
    await websocket.accept(subprotocol="bearer" if header_credential else None)
    try:
        async with asyncio.timeout(settings.realtime.hello_timeout_s):
            message = await websocket.receive_json()
    except (TimeoutError, ValueError):
        raise Unauthenticated(
            'send {"token": ...} (or {} after a bearer subprotocol) first'
        ) from None
    if not isinstance(message, dict):
        raise Unauthenticated("the first message must be a JSON object")
    return header_credential or message.get("token"), message


@router.websocket("/ws/executions/{execution_id}")
async def execution_socket(websocket: WebSocket, execution_id: uuid.UUID) -> None:
    app = websocket.app
    settings: Settings = app.state.settings
    hub: Hub = app.state.hub
    try:
        credential, hello = await _hello(websocket, settings)
        principal = await _principal(app, credential)
        await _can_read_execution(app, principal, execution_id)
        resume_from = hello.get("resume_from")
        if resume_from is not None and (not isinstance(resume_from, int) or resume_from < 0):
            raise ValidationFailed(
                "resume_from must be a seq (an integer >= 0)", field="resume_from"
            )
    except WebSocketDisconnect:
        return
    except DomainError as exc:
        await websocket.close(code=_close_code(exc), reason=str(exc)[:120])
        return
    follower = hub.follower()
    deadline = _deadline(settings, principal)
    batched = wants_batch(websocket)
    try:
        begun = await _begin_or_row(app, hub, execution_id, follower, resume_from)
        if begun is None:
            await websocket.close(code=CLOSE_TRY_AGAIN, reason="live progress unavailable")
            return
        first, done = begun
        if batched:
            for start in range(0, len(first), BATCH_MAX):
                if await _send_all(
                    websocket, first[start : start + BATCH_MAX], is_terminal, batched=True
                ):
                    done = True
                    break
        else:
            for text in first:
                await _send(websocket, text)
                if is_terminal(text):
                    done = True
                    break
        if done:
            await websocket.close(code=1000)
            return
        code = await _pump(websocket, follower, settings, deadline, ends_run, batched)
        await websocket.close(code=code)
    except Lagging:
        await websocket.close(code=CLOSE_SLOW, reason="too far behind: resume from your last seq")
    except WebSocketDisconnect:
        pass
    finally:
        await hub.unfollow(execution_id, follower)


def wants_batch(websocket: WebSocket) -> bool:
    """`?batch=1` (or `true`): several waiting messages go as one JSON-array frame."""
    return websocket.query_params.get("batch", "").lower() in ("1", "true", "yes")


def _finished_in(snapshot_text: str) -> bool:
    status = json.loads(snapshot_text)["execution"]["status"]
    return status in TERMINAL_EXECUTION


async def _pump(
    websocket: WebSocket,
    follower: Follower,
    settings: Settings,
    deadline: tuple[float, int],
    ends: Any,
    batched: bool = False,
) -> int:
    """Send queued events until the stream ends; returns the close code. Reads the
    client too (to notice it leaving) and pings it every heartbeat."""
    inbox = follower.inbox
    receiver = asyncio.create_task(_drain_client(websocket))
    receiver.add_done_callback(lambda _: inbox.wake())
    try:
        async with _watched(websocket, inbox, settings) as stream:
            beat = Heartbeat(settings.realtime.heartbeat_s)
            while True:
                if time.monotonic() >= deadline[0]:
                    return deadline[1]
                if receiver.done():
                    raise WebSocketDisconnect()
                if inbox.lagging:
                    raise Lagging()
                batch = inbox.take()
                if not batch:
                    stream.wake_at = min(deadline[0], beat.at)
                    await inbox.wait()
                    if beat.due():
                        await _send_all(websocket, [PING], None, stream=stream)
                    continue
                if await _send_all(websocket, batch, ends, batched=batched, stream=stream):
                    # Let the other followers woken with this one send the end first:
                    # the close and the teardown can wait, the events should not.
                    await asyncio.sleep(0)
                    return 1000
    finally:
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await receiver


class Stream:
    """One socket's sender as the process's Watch sees it."""

    __slots__ = ("inbox", "send_timeout_s", "sending_since", "task", "timed_out", "wake_at")

    def __init__(self, inbox: Inbox, task: asyncio.Task[Any], send_timeout_s: float) -> None:
        self.inbox = inbox
        self.task = task
        self.send_timeout_s = send_timeout_s
        # When its ping or its end is due (monotonic): the Watch wakes it then.
        self.wake_at = float("inf")
        # Set while a send is under way: the Watch stops one that takes too long.
        self.sending_since: float | None = None
        self.timed_out = False


class Watch:
    """The timers of every live-progress socket of this process, in one task: it wakes
    a socket whose ping or end is due and stops a send that has waited past
    REALTIME__SEND_TIMEOUT_S. A timer per wait and one per send meant a heap of
    thousands of timers, each set and cancelled every round of events: measured
    in-process at 1000 sockets, our layer's cost per socket and round fell from ~24 to
    ~9 µs without them. Runs only while some socket is open."""

    def __init__(self, tick_s: float) -> None:
        self.tick_s = tick_s
        self.streams: set[Stream] = set()
        self.task: asyncio.Task[None] | None = None

    def add(self, stream: Stream) -> None:
        self.streams.add(stream)
        loop = asyncio.get_running_loop()
        # A new task also when the app now runs on another loop (the old one is gone).
        if self.task is None or self.task.done() or self.task.get_loop() is not loop:
            self.task = loop.create_task(self._run(), name="ws.watch")

    async def _run(self) -> None:
        while self.streams:
            await asyncio.sleep(self.tick_s)
            now = time.monotonic()
            for stream in list(self.streams):
                if stream.timed_out:
                    continue  # cancelled once: a second cancel would outlive uncancel()
                if (
                    stream.sending_since is not None
                    and now - stream.sending_since >= stream.send_timeout_s
                ):
                    stream.timed_out = True
                    stream.task.cancel()
                elif now >= stream.wake_at:
                    stream.inbox.wake()


def _watch(app: Any, settings: Settings) -> Watch:
    watch: Watch | None = getattr(app.state, "realtime_watch", None)
    if watch is None:
        rt = settings.realtime
        # Fine enough for the shortest of its deadlines (a test's 1 s lifetime), at
        # most a second late for the usual ones (20 s pings, 30 s send limit).
        tick = min(rt.heartbeat_s, rt.send_timeout_s, rt.max_connection_s) / 4
        watch = app.state.realtime_watch = Watch(max(0.05, min(1.0, tick)))
    return watch


@contextlib.asynccontextmanager
async def _watched(websocket: WebSocket, inbox: Inbox, settings: Settings) -> AsyncIterator[Stream]:
    task = asyncio.current_task()
    assert task is not None
    watch = _watch(websocket.app, settings)
    stream = Stream(inbox, task, settings.realtime.send_timeout_s)
    watch.add(stream)
    try:
        yield stream
    finally:
        watch.streams.discard(stream)


class Heartbeat:
    """When the next ping is due on an idle stream."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.at = time.monotonic() + interval_s

    def due(self) -> bool:
        if time.monotonic() < self.at:
            return False
        self.at = time.monotonic() + self.interval_s
        return True


async def _wait(inbox: Inbox, until: float) -> None:
    """Until something is queued or `until` (monotonic) has come. One timer per wait,
    which is once per burst of events, not per event."""
    delay = max(0.01, until - time.monotonic())
    timer = asyncio.get_running_loop().call_later(delay, inbox.wake)
    try:
        await inbox.wait()
    finally:
        timer.cancel()


async def _send(websocket: WebSocket, text: str) -> None:
    """A send that cannot hang forever on a peer that stopped reading (4408)."""
    await _send_all(websocket, [text], None)


def frames(batch: list[str]) -> list[str]:
    """A batching client's frames for these messages: one JSON array per BATCH_MAX of
    them (each message is already JSON text: joining is all it takes), or the message
    itself when a frame would hold only one."""
    out = []
    for start in range(0, len(batch), BATCH_MAX):
        part = batch[start : start + BATCH_MAX]
        out.append(part[0] if len(part) == 1 else "[" + ",".join(part) + "]")
    return out


async def _send_all(
    websocket: WebSocket,
    batch: list[str],
    ends: Any,
    *,
    batched: bool = False,
    stream: Stream | None = None,
) -> bool:
    """Send in order until `ends` says a message was the last; True if one was. The
    time limit covers the batch: a client that cannot take it within
    REALTIME__SEND_TIMEOUT_S is too slow (4408). With a `stream` the process's Watch
    keeps that limit (no timer of our own); without one (a socket's first messages),
    a timer does. `batched`: as few frames as `frames` makes of them, nothing after
    the last message."""
    if stream is None:
        settings: Settings = websocket.app.state.settings
        try:
            async with asyncio.timeout(settings.realtime.send_timeout_s):
                return await _write(websocket, batch, ends, batched)
        except TimeoutError:
            raise Lagging() from None
    stream.sending_since = time.monotonic()
    try:
        return await _write(websocket, batch, ends, batched)
    except asyncio.CancelledError:
        if not stream.timed_out:
            raise
        # The Watch's cancel, not anyone else's: it is not passed on.
        stream.task.uncancel()
        raise Lagging() from None
    finally:
        stream.sending_since = None


async def _write(websocket: WebSocket, batch: list[str], ends: Any, batched: bool) -> bool:
    if batched:
        end = False
        if ends is not None:
            for i, text in enumerate(batch):
                if ends(text):
                    batch, end = batch[: i + 1], True
                    break
        for frame in frames(batch):
            await websocket.send_text(frame)
        return end
    for text in batch:
        await websocket.send_text(text)
        if ends is not None and ends(text):
            return True
    return False


async def _drain_client(websocket: WebSocket) -> None:
    while True:
        await websocket.receive_text()


# Server-Sent Events ----------------------------------------------------------------------


def _sse(text: str) -> str:
    body = json.loads(text) if text.startswith('{"seq"') else None
    if body is None:
        return f"event: snapshot\ndata: {text}\n\n"
    return f"id: {body['seq']}\nevent: {body['type']}\ndata: {text}\n\n"


@router.get("/executions/{execution_id}/events")
async def execution_events(
    request: Request,
    access: WorkspaceAccess = require(READ, resource=WorkflowExecution, param="execution_id"),
    last_event_id: Annotated[str | None, Header()] = None,
    resume_from: Annotated[int | None, Query(ge=0)] = None,
) -> StreamingResponse:
    """Server-Sent Events for one execution: a snapshot (unless resuming), every event
    after it with `id:` = seq, and the end after the terminal status (`curl -N`)."""
    app = request.app
    hub: Hub = app.state.hub
    settings: Settings = app.state.settings
    execution_id = access.resource.id
    start: int | None = resume_from
    if last_event_id is not None:
        try:
            start = int(last_event_id)
        except ValueError:
            raise ValidationFailed("Last-Event-ID must be a seq", field="Last-Event-ID") from None
        if start < 0:
            raise ValidationFailed("Last-Event-ID must be a seq", field="Last-Event-ID")
    deadline = _deadline(settings, access.principal)

    async def stream() -> AsyncIterator[str]:
        follower = hub.follower()
        inbox = follower.inbox
        try:
            begun = await _begin_or_row(app, hub, execution_id, follower, start)
            if begun is None:
                yield "event: unavailable\ndata: {}\n\n"
                return
            first, done = begun
            for text in first:
                yield _sse(text)
                if is_terminal(text):
                    return
            if done:
                return
            beat = Heartbeat(settings.realtime.heartbeat_s)
            while time.monotonic() < deadline[0]:
                if inbox.lagging:
                    yield "event: lagging\ndata: {}\n\n"
                    return
                batch = inbox.take()
                if not batch:
                    await _wait(inbox, min(deadline[0], beat.at))
                    if beat.due():
                        yield ": ping\n\n"
                    continue
                for live in batch:
                    yield _sse(live)
                    if is_terminal(live):
                        return
        except Lagging:
            yield "event: lagging\ndata: {}\n\n"
        finally:
            await hub.unfollow(execution_id, follower)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


# One socket, many channels ---------------------------------------------------------------


class Mux:
    """The channels of one multiplexed socket, all feeding one send queue."""

    def __init__(self, app: Any, principal: Principal, workspace_id: uuid.UUID | None) -> None:
        self.app = app
        self.hub: Hub = app.state.hub
        self.principal = principal
        self.workspace_id = workspace_id
        self.inbox = Inbox(self.hub.queue_size)
        self.executions: dict[uuid.UUID, Follower] = {}
        self.notices: dict[str, tuple[uuid.UUID, Follower]] = {}
        self.users: dict[str, Follower] = {}
        self._recount: dict[uuid.UUID, asyncio.Task[None]] = {}

    def _follower(self, wrap: Any) -> Follower:
        return Follower(self.inbox, wrap=wrap)

    def send(self, payload: dict[str, Any]) -> None:
        self.put(json.dumps(payload, separators=(",", ":"), default=str))

    def put(self, text: str) -> None:
        self.inbox.put(text)

    async def _workspace(self, raw: str | None, permission: Permission) -> uuid.UUID:
        try:
            workspace_id = uuid.UUID(raw) if raw else self.workspace_id
        except ValueError:
            raise DomainError("not a workspace id", field="channel") from None
        if workspace_id is None:
            raise DomainError("say which workspace: send workspace_id first", field="channel")
        async with self.app.state.sessionmaker() as session:
            await grant(session, self.principal, workspace_id, permission)
        return workspace_id

    async def subscribe(self, name: str, resume_from: int | None) -> None:
        kind, _, arg = name.partition(":")
        if kind == "executions":
            try:
                execution_id = uuid.UUID(arg)
            except ValueError:
                raise DomainError("not an execution id", field="channel") from None
            if execution_id in self.executions:
                return
            await _can_read_execution(self.app, self.principal, execution_id)
            prefix = f'{{"channel":"{name}","event":'
            follower = self._follower(lambda text: prefix + text + "}")
            if resume_from is not None and (
                not isinstance(resume_from, int) or isinstance(resume_from, bool) or resume_from < 0
            ):
                raise ValidationFailed(
                    "resume_from must be a seq (an integer >= 0)", field="resume_from"
                )
            if resume_from is None:
                seq = await self.hub.last_seq(execution_id)
                text = await snapshot(self.app, execution_id, seq)
                self.put(prefix + text + "}")
                follower.last = seq
            else:
                follower.last = resume_from
            self.executions[execution_id] = follower
            for text in await self.hub.follow(execution_id, follower):
                self.put(prefix + text + "}")
        elif kind in ("workflows", "workspace", "analytics"):
            if name in self.notices:
                return
            permission = Permission.ANALYTICS_READ if kind == "analytics" else READ
            workspace_id = await self._workspace(arg or None, permission)
            follower = self._follower(self._notice_filter(name, kind, workspace_id))
            self.notices[name] = (workspace_id, follower)
            await self.hub.listen(workspace_id, follower)
            if kind == "analytics":
                await self._counters(name, workspace_id)
        elif kind == "user":
            # A person's own channel only (tasks for them, their notifications).
            if self.principal.api_key is not None:
                raise DomainError("the user channel is for people, not API keys", field="channel")
            if arg and arg != str(self.principal.user.id):
                raise DomainError("only your own user channel", field="channel")
            if name in self.users:
                return
            prefix = f'{{"channel":"{name}","event":'
            follower = self._follower(lambda text: prefix + text + "}")
            self.users[name] = follower
            await self.hub.listen_channel(f"usr:{self.principal.user.id}", follower)
        else:
            raise DomainError(f"unknown channel {name!r}", field="channel")
        self.send({"type": "subscribed", "channel": name})

    def _notice_filter(self, name: str, kind: str, workspace_id: uuid.UUID) -> Any:
        prefix = f'{{"channel":"{name}","event":'

        def wrap(text: str) -> str | None:
            if kind == "analytics":
                if '"type":"execution.status"' in text:
                    self._schedule_recount(name, workspace_id)
                return None
            if kind == "workflows" and '"type":"workflow.' not in text:
                return None
            return prefix + text + "}"

        return wrap

    def _schedule_recount(self, name: str, workspace_id: uuid.UUID) -> None:
        task = self._recount.get(workspace_id)
        if task is None or task.done():

            async def later() -> None:
                # Coalesce a burst of status changes into one count.
                await asyncio.sleep(0.2)
                await self._counters(name, workspace_id)

            self._recount[workspace_id] = asyncio.create_task(later())

    async def _counters(self, name: str, workspace_id: uuid.UUID) -> None:
        # Runs by status and the current hour's aggregate (backend/analytics/live.py).
        async with self.app.state.sessionmaker() as session:
            data = await counters(session, workspace_id)
        self.send(
            {
                "channel": name,
                "event": {
                    "type": "analytics.counters",
                    "workspace_id": str(workspace_id),
                    "data": data,
                },
            }
        )

    async def unsubscribe(self, name: str) -> None:
        kind, _, arg = name.partition(":")
        if kind == "executions":
            with contextlib.suppress(ValueError):
                execution_id = uuid.UUID(arg)
                follower = self.executions.pop(execution_id, None)
                if follower is not None:
                    await self.hub.unfollow(execution_id, follower)
        elif name in self.notices:
            workspace_id, follower = self.notices.pop(name)
            await self.hub.unlisten(workspace_id, follower)
        elif name in self.users:
            await self.hub.unlisten_channel(f"usr:{self.principal.user.id}", self.users.pop(name))
        self.send({"type": "unsubscribed", "channel": name})

    async def close(self) -> None:
        for task in self._recount.values():
            task.cancel()
        for execution_id, follower in list(self.executions.items()):
            await self.hub.unfollow(execution_id, follower)
        for workspace_id, follower in list(self.notices.values()):
            await self.hub.unlisten(workspace_id, follower)
        for follower in list(self.users.values()):
            await self.hub.unlisten_channel(f"usr:{self.principal.user.id}", follower)


@router.websocket("/ws")
async def multiplexed_socket(websocket: WebSocket) -> None:
    await serve_channels(websocket)


async def serve_channels(websocket: WebSocket, subscribe: tuple[str, ...] = ()) -> None:
    """The multiplexed socket; `subscribe`: channels it joins right after the hello
    (WS /ws/analytics is this with the `analytics` channel)."""
    app = websocket.app
    settings: Settings = app.state.settings
    try:
        credential, hello = await _hello(websocket, settings)
        principal = await _principal(app, credential)
        raw_workspace = hello.get("workspace_id")
        workspace_id = uuid.UUID(raw_workspace) if raw_workspace else None
        if workspace_id is None and principal.api_key is not None:
            workspace_id = principal.api_key.workspace_id
    except WebSocketDisconnect:
        return
    except ValueError:
        await websocket.close(code=CLOSE_BAD, reason="workspace_id is not an id")
        return
    except DomainError as exc:
        await websocket.close(code=_close_code(exc), reason=str(exc)[:120])
        return
    mux = Mux(app, principal, workspace_id)
    deadline = _deadline(settings, principal)
    sender = asyncio.create_task(
        _send_mux(websocket, mux, settings, deadline, wants_batch(websocket))
    )
    try:
        for channel in subscribe:
            try:
                await mux.subscribe(channel, None)
            except DomainError as exc:
                mux.send(
                    {"type": "error", "channel": channel, "code": exc.code, "message": str(exc)}
                )
        while not sender.done():
            receive = asyncio.create_task(websocket.receive_json())
            await asyncio.wait({receive, sender}, return_when=asyncio.FIRST_COMPLETED)
            if not receive.done():
                receive.cancel()
                break
            try:
                message = receive.result()
            except ValueError:
                mux.send({"type": "error", "code": "bad_message", "message": "not JSON"})
                continue
            action = message.get("action") if isinstance(message, dict) else None
            name = message.get("channel") if isinstance(message, dict) else None
            if action not in ("subscribe", "unsubscribe") or not isinstance(name, str):
                mux.send(
                    {
                        "type": "error",
                        "code": "bad_message",
                        "message": "expected {action, channel}",
                    }
                )
                continue
            try:
                if action == "subscribe":
                    await mux.subscribe(name, message.get("resume_from"))
                else:
                    await mux.unsubscribe(name)
            except DomainError as exc:
                mux.send(
                    {
                        "type": "error",
                        "channel": name,
                        "code": getattr(exc, "code", "error"),
                        "message": str(exc),
                    }
                )
            except Lagging:
                mux.inbox.lagging = True
                mux.inbox.wake()
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        await mux.close()
        if not sender.done():
            sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            code = await sender
            await websocket.close(code=code)


async def _send_mux(
    websocket: WebSocket,
    mux: Mux,
    settings: Settings,
    deadline: tuple[float, int],
    batched: bool = False,
) -> int:
    async with _watched(websocket, mux.inbox, settings) as stream:
        beat = Heartbeat(settings.realtime.heartbeat_s)
        while True:
            if time.monotonic() >= deadline[0]:
                return deadline[1]
            if mux.inbox.lagging:
                return CLOSE_SLOW
            batch = mux.inbox.take()
            if not batch:
                stream.wake_at = min(deadline[0], beat.at)
                await mux.inbox.wait()
                if beat.due():
                    await _send_all(websocket, [PING], None, stream=stream)
                continue
            await _send_all(websocket, batch, None, batched=batched, stream=stream)
