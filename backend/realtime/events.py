"""Execution events: a gap-free, replayable log per execution.

Every event of an execution gets the next `seq` from a Redis counter and is appended,
in one atomic Lua call, to the execution's Redis stream (stream id `<seq>-0`, capped in
length, expiring some days after its last event) and published on its pub/sub channel
for live followers. Pub/sub alone loses what a follower was away for; the stream is the
replay log, and when a run ends its log is archived to PostgreSQL (`execution_events`),
so a client resuming after the stream expired still gets exactly what it missed.

Redis may be away when an event is published: the process keeps it (`EventLog.send`,
bounded per run) and publishes what it kept, in order, once Redis answers; the API's hub
gives followers the run's end from PostgreSQL meanwhile (see hub.py).

Events are published after the state they describe is committed, except `node.status`
`running` (a node starting is not checkpointed, to save a round trip per node) and
`agent.delta` (text as it is written).

Shape (DESIGN.md): {seq, id, type, execution_id, node_id?, status?, timestamp, data}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy import event as sa_event
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from backend.config import get_settings
from backend.executions.state import TERMINAL_EXECUTION
from backend.kit.logging import get_logger
from backend.models import ExecutionEvent, WorkflowExecution

log = get_logger(__name__)

EXECUTION_STATUS, NODE_STATUS, NODE_LOG, AGENT_DELTA = (
    "execution.status",
    "node.status",
    "node.log",
    "agent.delta",
)
# Streams are capped (approximately). A run with more events than this loses its oldest
# ones: the archive copies the stream when the run ends, not before (see the notes).
STREAM_MAXLEN = 100_000
STREAM_TTL_S = 7 * 24 * 3600
_SEQ = re.compile(rb'^\{"seq":(\d+),')
# Executions whose run ended and whose log awaits archiving (see `archive_pending`).
ARCHIVE_SET = "ev:archive"

# KEYS: counter, stream, archive set, end mark. ARGV: maxlen, ttl, channel, workspace
# channel, final flag ('1': these events end the run: its log joins the set the archiver
# drains and gets its end mark), floor (the counter never goes below it: a Redis that
# lost its data does not hand out seqs followers already had), events...
# Each event is a JSON object without `seq`; the script puts it first, so followers can
# read it without parsing the whole event. execution.status events also go to the
# workspace channel (live counters, workflow lists).
# The end mark holds the seq of the run's terminal event: a run ends once. A second
# final publish (the server's stand-in for an end that never arrived, then the worker's
# own, re-sent after an outage) appends nothing and answers the first one's seq.
_PUBLISH = """
if ARGV[5] == '1' then
  local ended = redis.call('GET', KEYS[4])
  if ended then
    return tonumber(ended)
  end
end
local floor = tonumber(ARGV[6])
if floor > 0 and tonumber(redis.call('GET', KEYS[1]) or '0') < floor then
  redis.call('SET', KEYS[1], floor)
end
local n = #ARGV - 6
local seq = redis.call('INCRBY', KEYS[1], n) - n
for i = 7, #ARGV do
  seq = seq + 1
  local ev = '{"seq":' .. seq .. ',' .. string.sub(ARGV[i], 2)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], seq .. '-0', 'e', ev)
  redis.call('PUBLISH', ARGV[3], ev)
  if ARGV[4] ~= '' and string.find(ARGV[i], '"type":"execution.status"', 1, true) then
    redis.call('PUBLISH', ARGV[4], ev)
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
if ARGV[5] == '1' then
  redis.call('SET', KEYS[4], seq, 'EX', ARGV[2])
  redis.call('SADD', KEYS[3], string.match(KEYS[2], '{(.*)}'))
end
return seq
"""


def seq_key(execution_id: uuid.UUID | str) -> str:
    # One hash tag per execution: counter and stream live on the same cluster slot.
    return f"ev:{{{execution_id}}}:seq"


def stream_key(execution_id: uuid.UUID | str) -> str:
    return f"ev:{{{execution_id}}}:log"


def end_key(execution_id: uuid.UUID | str) -> str:
    return f"ev:{{{execution_id}}}:end"


def channel(execution_id: uuid.UUID | str) -> str:
    return f"ev:{execution_id}"


def workspace_channel(workspace_id: uuid.UUID | str) -> str:
    return f"ws:{workspace_id}"


def seq_of(raw: bytes | str) -> int:
    data = raw.encode() if isinstance(raw, str) else raw
    match = _SEQ.match(data)
    if match is None:
        raise ValueError("not an execution event")
    return int(match.group(1))


def with_seq(text: str, seq: int) -> str:
    """An event (JSON without `seq`) with its seq put first, as the script does."""
    return f'{{"seq":{seq},' + text[1:]


TERMINAL_MARKS = tuple(f'"status":"{s}"' for s in TERMINAL_EXECUTION)


def is_terminal(text: str) -> bool:
    """The run's last event? A cheap test first, then the event's own fields (a node
    output could contain the same words)."""
    if '"type":"execution.status"' not in text or not any(m in text for m in TERMINAL_MARKS):
        return False
    body = json.loads(text)
    return bool(body.get("type") == "execution.status" and body.get("status") in TERMINAL_EXECUTION)


def event(
    type_: str,
    execution_id: uuid.UUID,
    *,
    node_id: str | None = None,
    status: str | None = None,
    data: dict[str, Any] | None = None,
) -> str:
    body: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "type": type_,
        "execution_id": str(execution_id),
    }
    if node_id is not None:
        body["node_id"] = node_id
    if status is not None:
        body["status"] = status
    body["timestamp"] = datetime.now(UTC).isoformat()
    body["data"] = data or {}
    return json.dumps(body, separators=(",", ":"), default=str)


def status_event(execution: WorkflowExecution) -> str:
    data: dict[str, Any] = {
        "workflow_id": str(execution.workflow_id),
        "workspace_id": str(execution.workspace_id),
    }
    if execution.error:
        data["error"] = execution.error
    if execution.finished_at is not None:
        size = len(json.dumps(execution.output, default=str))
        if size <= 16_384:
            data["output"] = execution.output
        else:
            # Big outputs stay in the execution row (GET /executions/{id}).
            data["output_bytes"] = size
        data.update(
            duration_ms=execution.duration_ms,
            input_tokens=execution.input_tokens,
            output_tokens=execution.output_tokens,
            cost_usd=execution.cost_usd,
        )
    return event(EXECUTION_STATUS, execution.id, status=str(execution.status), data=data)


# What a process keeps of events Redis did not take, until it answers again: per run,
# and for so many runs (the oldest run's are dropped first, the newest events kept).
KEEP_EVENTS_PER_RUN = 10_000
KEEP_RUNS = 1_000
RESEND_MAX_DELAY_S = 2.0
# Redis did not answer (down, restarting, loading, unreachable): worth trying again.
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)


@dataclass(eq=False)
class _Unsent:
    workspace_id: uuid.UUID | None
    # (events, final) in publish order; a final batch is the run's terminal status.
    batches: deque[tuple[list[str], bool]] = field(default_factory=deque)
    count: int = 0


class EventLog:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._publish = redis.register_script(_PUBLISH)
        # The last seq Redis gave each run here (the floor for the next publish).
        self._seqs: OrderedDict[uuid.UUID, int] = OrderedDict()
        self._unsent: OrderedDict[uuid.UUID, _Unsent] = OrderedDict()
        self._resender: asyncio.Task[None] | None = None

    async def publish(
        self,
        execution_id: uuid.UUID,
        workspace_id: uuid.UUID | None,
        events: list[str],
        *,
        final: bool = False,
        floor: int = 0,
    ) -> int:
        """Append events in order; returns the last seq. `final`: the run ended, so its
        log is queued for archiving and marked ended (a second final publish appends
        nothing). `floor`: a seq the run's counter must not be below."""
        floor = max(floor, self._seqs.get(execution_id, 0))
        args: list[Any] = [
            STREAM_MAXLEN,
            STREAM_TTL_S,
            channel(execution_id),
            workspace_channel(workspace_id) if workspace_id else "",
            "1" if final else "",
            floor,
            *events,
        ]
        keys = [seq_key(execution_id), stream_key(execution_id), ARCHIVE_SET, end_key(execution_id)]
        seq = int(await self._publish(keys=keys, args=args))
        self._seqs[execution_id] = seq
        self._seqs.move_to_end(execution_id)
        if len(self._seqs) > KEEP_RUNS:
            self._seqs.popitem(last=False)
        return seq

    async def send(
        self,
        execution_id: uuid.UUID,
        workspace_id: uuid.UUID | None,
        events: list[str],
        *,
        final: bool = False,
    ) -> None:
        """Publish, or keep the events and publish them, in order, once Redis answers
        again. Never raises: a run does not fail over its events."""
        if execution_id not in self._unsent:
            try:
                await self.publish(execution_id, workspace_id, events, final=final)
                return
            except UNREACHABLE as exc:
                log.warning(
                    "events.publish_failed",
                    execution_id=str(execution_id),
                    events=len(events),
                    error=repr(exc),
                )
            except Exception:
                # Redis answered and refused: sending again would not help.
                log.exception("events.publish_refused", execution_id=str(execution_id))
                return
        # Older events of the run wait: these go behind them (seqs are Redis's, given
        # when they go out, so the order holds).
        self._keep(execution_id, workspace_id, events, final)

    def unsent(self, execution_id: uuid.UUID) -> int:
        """Events of the run kept here for Redis."""
        pending = self._unsent.get(execution_id)
        return pending.count if pending else 0

    def _keep(
        self,
        execution_id: uuid.UUID,
        workspace_id: uuid.UUID | None,
        events: list[str],
        final: bool,
    ) -> None:
        pending = self._unsent.get(execution_id)
        if pending is None:
            pending = self._unsent[execution_id] = _Unsent(workspace_id)
            if len(self._unsent) > KEEP_RUNS:
                dropped, lost = self._unsent.popitem(last=False)
                log.error("events.dropped", execution_id=str(dropped), events=lost.count)
        last = pending.batches[-1] if pending.batches else None
        if last is not None and not last[1] and not final:
            last[0].extend(events)
        else:
            pending.batches.append((list(events), final))
        pending.count += len(events)
        while pending.count > KEEP_EVENTS_PER_RUN and not pending.batches[0][1]:
            # The oldest go first; the run's end is never dropped.
            oldest = pending.batches[0][0]
            excess = min(len(oldest), pending.count - KEEP_EVENTS_PER_RUN)
            del oldest[:excess]
            pending.count -= excess
            if not oldest:
                pending.batches.popleft()
            log.error("events.dropped", execution_id=str(execution_id), events=excess)
        if self._resender is None or self._resender.done():
            self._resender = asyncio.get_running_loop().create_task(self._resend())

    async def _resend(self) -> None:
        """Publish what was kept, run by run and in order, retrying with a growing pause
        until Redis answers. Lives on the loop that kept the events (a worker's loop runs
        while it runs tasks: a pause between tasks only delays the retry)."""
        delay = 0.05
        while self._unsent:
            await asyncio.sleep(delay)
            try:
                for execution_id in list(self._unsent):
                    await self._resend_run(execution_id)
            except UNREACHABLE as exc:
                delay = min(RESEND_MAX_DELAY_S, delay * 2)
                log.warning("events.resend_failed", runs=len(self._unsent), error=repr(exc))

    async def _resend_run(self, execution_id: uuid.UUID) -> None:
        pending = self._unsent[execution_id]
        while pending.batches:
            events, final = pending.batches[0]
            # Bounded calls: one script call holds Redis while it runs.
            chunk = events[:500]
            try:
                await self.publish(execution_id, pending.workspace_id, chunk, final=final)
            except UNREACHABLE:
                raise
            except Exception:
                log.exception("events.publish_refused", execution_id=str(execution_id))
            del events[: len(chunk)]
            pending.count -= len(chunk)
            if not events:
                pending.batches.popleft()
        del self._unsent[execution_id]
        log.info("events.resent", execution_id=str(execution_id))

    async def last_seq(self, execution_id: uuid.UUID) -> int:
        value = await self.redis.get(seq_key(execution_id))
        return int(value or 0)

    async def end_seq(
        self, execution_id: uuid.UUID, engine: AsyncEngine | None = None
    ) -> int | None:
        """The seq of the run's terminal event, or None while its log has none: the end
        mark, else the stream's last event (logs written before end marks), else the
        archive's."""
        marked = await self.redis.get(end_key(execution_id))
        if marked is not None:
            return int(marked)
        entries: Any = await self.redis.xrevrange(stream_key(execution_id), count=1)
        if entries:
            text = _text(entries[0][1][b"e"])
            return seq_of(text) if is_terminal(text) else None
        if engine is None:
            return None
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    select(ExecutionEvent.seq, ExecutionEvent.event)
                    .where(ExecutionEvent.execution_id == execution_id)
                    .order_by(ExecutionEvent.seq.desc())
                    .limit(1)
                )
            ).first()
        if row is None:
            return None
        body = row[1]
        ended = body.get("type") == EXECUTION_STATUS and body.get("status") in TERMINAL_EXECUTION
        return int(row[0]) if ended else None

    async def archived_seq(self, engine: AsyncEngine | None, execution_id: uuid.UUID) -> int:
        if engine is None:
            return 0
        async with engine.connect() as conn:
            value = await conn.scalar(
                select(func.max(ExecutionEvent.seq)).where(
                    ExecutionEvent.execution_id == execution_id
                )
            )
        return int(value or 0)

    async def read(
        self,
        execution_id: uuid.UUID,
        after: int,
        upto: int | None = None,
        engine: AsyncEngine | None = None,
    ) -> list[str]:
        """The events with after < seq <= upto, in order: from the stream, and from the
        PostgreSQL archive for whatever the stream no longer holds."""
        entries: Any = await self.redis.xrange(
            stream_key(execution_id), min=f"{after + 1}-0", max=f"{upto}-0" if upto else "+"
        )
        out = [_text(fields[b"e"]) for _, fields in entries]
        first = seq_of(out[0]) if out else (upto + 1 if upto else None)
        if engine is not None and (first is None or first > after + 1):
            async with engine.connect() as conn:
                stmt = select(ExecutionEvent.event).where(
                    ExecutionEvent.execution_id == execution_id, ExecutionEvent.seq > after
                )
                if first is not None:
                    stmt = stmt.where(ExecutionEvent.seq < first)
                rows = await conn.execute(stmt.order_by(ExecutionEvent.seq))
                older = [json.dumps(r[0], separators=(",", ":")) for r in rows]
            out = [_seq_first(e) for e in older] + out
        return out

    async def archive_pending(self, engine: AsyncEngine, batch: int = 200) -> int:
        """Copy the logs of runs that ended to PostgreSQL, a batch at a time: one
        pipelined read and one insert for many runs, off the runs' own path (this was a
        round trip to each store per run when done at close). Idempotent; a batch that
        fails to insert goes back into the set."""
        done = 0
        while True:
            # Read, insert, then remove: a worker killed in between leaves the ids in
            # the set for the next tick (the insert is idempotent).
            raw_ids: Any = await self.redis.srandmember(ARCHIVE_SET, batch)
            if not raw_ids:
                return done
            ids = [uuid.UUID(_text(i)) for i in raw_ids]
            async with self.redis.pipeline(transaction=False) as pipe:
                for execution_id in ids:
                    pipe.xrange(stream_key(execution_id))
                streams: list[Any] = await pipe.execute()
            rows = [
                {"execution_id": eid, "seq": seq_of(f[b"e"]), "event": json.loads(f[b"e"])}
                for eid, entries in zip(ids, streams, strict=True)
                for _, f in entries
            ]
            if rows:
                async with engine.begin() as conn:
                    await conn.execute(insert(ExecutionEvent).on_conflict_do_nothing(), rows)
            await self.redis.srem(ARCHIVE_SET, *raw_ids)
            done += len(ids)


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _seq_first(text: str) -> str:
    """PostgreSQL's JSONB does not keep key order; put seq first again."""
    body = json.loads(text)
    seq = body.pop("seq")
    return json.dumps({"seq": seq, **body}, separators=(",", ":"))


# One client per event loop: the API has one loop, a worker process one, and tests one
# per test; a client must not outlive the loop its connections belong to.
_logs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EventLog] = weakref.WeakKeyDictionary()


def event_log() -> EventLog:
    loop = asyncio.get_running_loop()
    current = _logs.get(loop)
    if current is None:
        settings = get_settings()
        redis = Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.redis.socket_timeout_s,
            socket_connect_timeout=settings.redis.socket_connect_timeout_s,
        )
        current = _logs[loop] = EventLog(redis)
    return current


def publish_after_commit(uow: Any, execution: WorkflowExecution) -> None:
    """Queue the execution's current status as an event once the unit of work commits."""
    text = status_event(execution)
    execution_id, workspace_id = execution.id, execution.workspace_id
    final = execution.status in TERMINAL_EXECUTION

    async def publish() -> None:
        # Kept and re-sent if Redis does not answer (behind any of the run's events
        # still waiting), so the run's end reaches its followers once Redis is back.
        await event_log().send(execution_id, workspace_id, [text], final=final)

    publish.__name__ = "publish:execution.status"
    uow.after_commit(publish)


# Workspace notices ----------------------------------------------------------------------
# Every change a service records in the activity log is also announced, after commit, on
# the workspace's channel: the multiplexed socket's `workflows` and `workspace:<id>`
# channels are built from these. Best effort (no seq): a client that missed some
# refetches the list it shows.

_NOTICES = "orch_notices"
_inflight: set[asyncio.Task[None]] = set()


def announce(session: Any, workspace_id: uuid.UUID, notice: dict[str, Any]) -> None:
    """Queue a notice on the session; it goes out if, and only if, the session commits."""
    session.info.setdefault(_NOTICES, []).append((workspace_id, notice))


@sa_event.listens_for(Session, "after_commit")
def _send_notices(session: Session) -> None:
    notices = session.info.pop(_NOTICES, None)
    if not notices:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return

    async def send() -> None:
        try:
            redis = event_log().redis
            for workspace_id, notice in notices:
                body = {"timestamp": datetime.now(UTC).isoformat(), **notice}
                await redis.publish(
                    workspace_channel(workspace_id),
                    json.dumps(body, separators=(",", ":"), default=str),
                )
        except Exception:
            log.warning("notices.publish_failed", exc_info=True)

    task = loop.create_task(send())
    _inflight.add(task)
    task.add_done_callback(_inflight.discard)


@sa_event.listens_for(Session, "after_rollback")
def _drop_notices(session: Session) -> None:
    session.info.pop(_NOTICES, None)


# How long the emitter gathers events before sending them in one call.
COALESCE_S = 0.005


class Emitter:
    """The runner's side: events are queued without waiting and sent in order, in
    batches, by one task per execution, so publishing never sits on the hot path
    between a checkpoint and the next node. `drain` waits until everything queued was
    published, or kept for Redis to take later (it never waits out an outage)."""

    def __init__(self) -> None:
        self._queues: dict[uuid.UUID, deque[str]] = {}
        self._tasks: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._workspaces: dict[uuid.UUID, uuid.UUID] = {}
        # Set by drain: stop gathering and send now.
        self._now: dict[uuid.UUID, asyncio.Event] = {}

    def emit(self, execution_id: uuid.UUID, workspace_id: uuid.UUID, text: str) -> None:
        queue = self._queues.setdefault(execution_id, deque())
        queue.append(text)
        self._workspaces[execution_id] = workspace_id
        task = self._tasks.get(execution_id)
        if task is None or task.done():
            now = self._now[execution_id] = asyncio.Event()
            # The task gets its queue and event now: a drain that runs before the task
            # first does (a run closing right after its last emit) pops the dicts.
            self._tasks[execution_id] = asyncio.get_running_loop().create_task(
                self._flush(execution_id, queue, now, workspace_id)
            )

    async def _flush(
        self,
        execution_id: uuid.UUID,
        queue: deque[str],
        now: asyncio.Event,
        workspace_id: uuid.UUID,
    ) -> None:
        while queue:
            # A short window lets the events of the next few nodes join the batch:
            # one Redis call for many events costs the runner far less than one each.
            # A drain (the run is closing or parking) cuts the window short.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(COALESCE_S):
                    await now.wait()
            batch = list(queue)
            queue.clear()
            # Never fails the run: what Redis does not take now is kept and re-sent in
            # order once it answers (and followers fall back to the committed state).
            await event_log().send(execution_id, workspace_id, batch)

    async def drain(self, execution_id: uuid.UUID) -> None:
        """Send everything queued for the run, now, and wait until it is out (published,
        or kept for when Redis answers again)."""
        task = self._tasks.pop(execution_id, None)
        now = self._now.pop(execution_id, None)
        if now is not None:
            now.set()
        if task is not None:
            await asyncio.shield(task)
        self._queues.pop(execution_id, None)
        self._workspaces.pop(execution_id, None)
