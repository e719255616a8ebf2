"""Live progress: WebSocket and Server-Sent Events.

- `WS /api/v1/ws/executions/{id}`: one execution. The credential (access token or API
  key) comes in the `Sec-WebSocket-Protocol` header as `bearer, <credential>` or in the
  first message; the first message (`{}` when the header carried the credential) may
  hold `resume_from`. Without it the client gets a snapshot, then every later event;
  with it, exactly the events after that seq. The socket closes after the terminal
  status.
- `GET /api/v1/executions/{id}/events`: the same as SSE (`id:` = seq, `Last-Event-ID`).
- `WS /api/v1/ws`: many channels on one socket (`executions:<id>`, `workflows`,
  `workspace:<id>`, `analytics`), with subscribe/unsubscribe messages.

Close codes: 4400 bad message, 4401 not authenticated or credential expired, 4403
forbidden, 4404 not found, 4429 rate limited, 4408 too slow (resume from your last
seq), 4000 maximum lifetime reached (reconnect and resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from sqlalchemy import func, select

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
from backend.realtime.hub import Follower, Hub, Lagging

log = get_logger(__name__)
router = APIRouter(tags=["realtime"])
READ = Permission.WORKFLOWS_READ
TERMINAL_MARKS = tuple(f'"status":"{s}"' for s in TERMINAL_EXECUTION)
CLOSE_BAD, CLOSE_AUTH, CLOSE_FORBIDDEN, CLOSE_NOT_FOUND, CLOSE_SLOW, CLOSE_LIFETIME = (
    4400,
    4401,
    4403,
    4404,
    4408,
    4000,
)
CLOSE_RATE_LIMITED = 4429
PING = '{"type":"ping"}'


def is_terminal(text: str) -> bool:
    """The run's last event? A cheap test first, then the event's own fields (a node
    output could contain the same words)."""
    if '"type":"execution.status"' not in text or not any(m in text for m in TERMINAL_MARKS):
        return False
    body = json.loads(text)
    return bool(body.get("type") == "execution.status" and body.get("status") in TERMINAL_EXECUTION)


async def _ended_before(app: Any, execution_id: uuid.UUID, seq: int, hub: Hub) -> bool:
    """A resume at or past a finished run's last event: nothing more will come."""
    if seq < await hub.last_seq(execution_id):
        return False  # events to send: the common case costs no database query
    async with app.state.sessionmaker() as session:
        status = await session.scalar(
            select(WorkflowExecution.status).where(WorkflowExecution.id == execution_id)
        )
    return status in TERMINAL_EXECUTION


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
    try:
        if resume_from is None:
            seq = await hub.last_seq(execution_id)
            text = await snapshot(app, execution_id, seq)
            await _send(websocket, text)
            follower.last = seq
            # Finished before we came: the snapshot is the whole story, unless its last
            # event is still on its way (then it follows and ends the stream).
            if _finished_in(text) and await hub.last_seq(execution_id) <= seq:
                await websocket.close(code=1000)
                return
        else:
            follower.last = resume_from
            if await _ended_before(app, execution_id, resume_from, hub):
                await websocket.close(code=1000)
                return
        for text in await hub.follow(execution_id, follower):
            await _send(websocket, text)
            if is_terminal(text):
                await websocket.close(code=1000)
                return
        code = await _pump(websocket, follower, settings, deadline, is_terminal)
        await websocket.close(code=code)
    except Lagging:
        await websocket.close(code=CLOSE_SLOW, reason="too far behind: resume from your last seq")
    except WebSocketDisconnect:
        pass
    finally:
        await hub.unfollow(execution_id, follower)


def _finished_in(snapshot_text: str) -> bool:
    status = json.loads(snapshot_text)["execution"]["status"]
    return status in TERMINAL_EXECUTION


async def _pump(
    websocket: WebSocket,
    follower: Follower,
    settings: Settings,
    deadline: tuple[float, int],
    ends: Any,
) -> int:
    """Send queued events until the stream ends; returns the close code. Reads the
    client too (to notice it leaving) and pings it every heartbeat."""
    receiver = asyncio.create_task(_drain_client(websocket))
    try:
        beat = Heartbeat(settings.realtime.heartbeat_s)
        while True:
            if time.monotonic() >= deadline[0]:
                return deadline[1]
            if receiver.done():
                raise WebSocketDisconnect()
            if follower.lagging.is_set():
                raise Lagging()
            text = await _next(follower.queue, deadline[0], beat)
            if text is None:
                if beat.due():
                    await websocket.send_text(PING)
                continue
            await _send(websocket, text)
            if ends(text):
                return 1000
    finally:
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await receiver


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


async def _next(queue: asyncio.Queue[str], until: float, beat: Heartbeat) -> str | None:
    """The next queued message, or None once a ping is due or `until` has come."""
    try:
        async with asyncio.timeout(max(0.01, min(until, beat.at) - time.monotonic())):
            return await queue.get()
    except TimeoutError:
        return None


async def _send(websocket: WebSocket, text: str) -> None:
    """A send that cannot hang forever on a peer that stopped reading (4408)."""
    settings: Settings = websocket.app.state.settings
    try:
        async with asyncio.timeout(settings.realtime.send_timeout_s):
            await websocket.send_text(text)
    except TimeoutError:
        raise Lagging() from None


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
        try:
            if start is None:
                seq = await hub.last_seq(execution_id)
                text = await snapshot(app, execution_id, seq)
                yield _sse(text)
                follower.last = seq
                if _finished_in(text) and await hub.last_seq(execution_id) <= seq:
                    return
            else:
                follower.last = start
                if await _ended_before(app, execution_id, start, hub):
                    return
            for text in await hub.follow(execution_id, follower):
                yield _sse(text)
                if is_terminal(text):
                    return
            beat = Heartbeat(settings.realtime.heartbeat_s)
            while time.monotonic() < deadline[0]:
                if follower.lagging.is_set():
                    yield "event: lagging\ndata: {}\n\n"
                    return
                live = await _next(follower.queue, deadline[0], beat)
                if live is None:
                    if beat.due():
                        yield ": ping\n\n"
                    continue
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
        self.queue: asyncio.Queue[str] = asyncio.Queue(self.hub.queue_size)
        self.lagging = asyncio.Event()
        self.executions: dict[uuid.UUID, Follower] = {}
        self.notices: dict[str, tuple[uuid.UUID, Follower]] = {}
        self._recount: dict[uuid.UUID, asyncio.Task[None]] = {}

    def _follower(self, wrap: Any) -> Follower:
        follower = Follower(self.queue, wrap=wrap)
        follower.lagging = self.lagging
        return follower

    def send(self, payload: dict[str, Any]) -> None:
        self.put(json.dumps(payload, separators=(",", ":"), default=str))

    def put(self, text: str) -> None:
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:
            self.lagging.set()

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
        async with self.app.state.sessionmaker() as session:
            rows = await session.execute(
                select(WorkflowExecution.status, func.count())
                .where(WorkflowExecution.workspace_id == workspace_id)
                .group_by(WorkflowExecution.status)
            )
            counts = {status: count for status, count in rows.all()}
        self.send(
            {
                "channel": name,
                "event": {
                    "type": "analytics.counters",
                    "workspace_id": str(workspace_id),
                    "data": {
                        s: counts.get(s, 0)
                        for s in ("pending", "running", "completed", "failed", "cancelled")
                    },
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
        self.send({"type": "unsubscribed", "channel": name})

    async def close(self) -> None:
        for task in self._recount.values():
            task.cancel()
        for execution_id, follower in list(self.executions.items()):
            await self.hub.unfollow(execution_id, follower)
        for workspace_id, follower in list(self.notices.values()):
            await self.hub.unlisten(workspace_id, follower)


@router.websocket("/ws")
async def multiplexed_socket(websocket: WebSocket) -> None:
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
    sender = asyncio.create_task(_send_mux(websocket, mux, settings, deadline))
    try:
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
                mux.lagging.set()
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
    websocket: WebSocket, mux: Mux, settings: Settings, deadline: tuple[float, int]
) -> int:
    beat = Heartbeat(settings.realtime.heartbeat_s)
    while True:
        if time.monotonic() >= deadline[0]:
            return deadline[1]
        if mux.lagging.is_set():
            return CLOSE_SLOW
        text = await _next(mux.queue, deadline[0], beat)
        if text is None:
            if beat.due():
                await websocket.send_text(PING)
            continue
        await _send(websocket, text)
