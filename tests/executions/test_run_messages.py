"""Run messages of one process: a run alone goes as `workflow.execute`; runs committed
while a message is being published go together as `workflow.execute_many`, each run in
exactly one message, and each caller returns only once its run's message is out.

Observed through Celery's `after_task_publish` signal on the real broker of this test
worker (runs that do not exist: a worker that takes the messages finds nothing to claim)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from celery.signals import after_task_publish, before_task_publish

from backend.executions import lifecycle
from backend.kit.logging import REQUEST_ID_KEY


@contextlib.contextmanager
def published() -> Iterator[list[tuple[str, list[str]]]]:
    """(task, run ids) of every message published meanwhile, in order."""
    seen: list[tuple[str, list[str]]] = []

    def record(sender: str | None = None, body: Any = None, **_: Any) -> None:
        args = body[0] if isinstance(body, tuple) else body.get("args", [])
        ids = args[0] if sender == lifecycle.EXECUTE_MANY_TASK else args
        seen.append((str(sender), [str(i) for i in ids]))

    after_task_publish.connect(record, weak=False)
    try:
        yield seen
    finally:
        after_task_publish.disconnect(record)


async def test_a_lone_run_goes_alone() -> None:
    lone = uuid.uuid4()
    with published() as messages:
        await lifecycle._send_run(lone)
        assert messages == [(lifecycle.EXECUTE_TASK, [str(lone)])]


async def test_runs_started_together_share_messages_each_run_in_one() -> None:
    ids = [uuid.uuid4() for _ in range(25)]
    out_before_return: dict[uuid.UUID, bool] = {}
    with published() as messages:

        async def start(execution_id: uuid.UUID) -> None:
            await lifecycle._send_run(execution_id)
            out_before_return[execution_id] = any(str(execution_id) in b for _, b in messages)

        await asyncio.gather(*(start(i) for i in ids))
    everything = [i for _, batch in messages for i in batch]
    assert sorted(everything) == sorted(str(i) for i in ids)  # each exactly once
    assert all(out_before_return.values()) and len(out_before_return) == 25
    # 25 committed in one tick: three messages (10, 10, 5), not 25.
    assert [len(batch) for _, batch in messages] == [10, 10, 5]
    assert {task for task, _ in messages} == {lifecycle.EXECUTE_MANY_TASK}


async def test_a_caller_that_stops_waiting_does_not_stop_its_runs_message() -> None:
    patient, impatient = uuid.uuid4(), uuid.uuid4()
    with published() as messages:
        first = asyncio.create_task(lifecycle._send_run(patient))
        second = asyncio.create_task(lifecycle._send_run(impatient))
        await asyncio.sleep(0)
        second.cancel()
        await first
        for _ in range(200):
            if any(str(impatient) in batch for _, batch in messages):
                break
            await asyncio.sleep(0.01)
    everything = [i for _, batch in messages for i in batch]
    assert sorted(everything) == sorted([str(patient), str(impatient)])


async def test_a_message_carries_a_request_id_only_for_that_requests_run_alone() -> None:
    """A lone run's message carries its request's id (the worker's log lines join it);
    a message for several requests' runs carries none, never one request's id on
    another's runs."""
    headers_of: dict[str, str | None] = {}

    def record(sender: str | None = None, headers: Any = None, body: Any = None, **_: Any) -> None:
        args = body[0] if isinstance(body, tuple) else body.get("args", [])
        key = str(sender) + ":" + ",".join(map(str, args[0] if isinstance(args[0], list) else args))
        headers_of[key] = (headers or {}).get(REQUEST_ID_KEY)

    async def start(execution_id: uuid.UUID, request_id: str) -> None:
        structlog.contextvars.bind_contextvars(**{REQUEST_ID_KEY: request_id})
        await lifecycle._send_run(execution_id)

    before_task_publish.connect(record, weak=False)
    try:
        lone = uuid.uuid4()
        await asyncio.create_task(start(lone, "req-lone"))
        together = [uuid.uuid4() for _ in range(3)]
        await asyncio.gather(*(start(i, f"req-{n}") for n, i in enumerate(together)))
    finally:
        before_task_publish.disconnect(record)
    assert headers_of[f"{lifecycle.EXECUTE_TASK}:{lone}"] == "req-lone"
    many = f"{lifecycle.EXECUTE_MANY_TASK}:" + ",".join(map(str, together))
    assert many in headers_of and headers_of[many] is None


async def test_under_load_a_run_committed_a_moment_later_joins_the_next_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A message went out just now (load): the next one waits COALESCE_S for runs
    committed meanwhile, so a run started one loop turn later shares it."""
    # "Just now" is generous here: a stall of a loaded machine between the first publish
    # and the next message must not make this a test of the clock.
    monkeypatch.setattr(lifecycle, "BUSY_WITHIN_S", 60.0)
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    with published() as messages:
        await lifecycle._send_run(first)
        b = asyncio.create_task(lifecycle._send_run(second))
        await asyncio.sleep(0)  # the message's sender is already running
        c = asyncio.create_task(lifecycle._send_run(third))
        await asyncio.gather(b, c)
    assert messages == [
        (lifecycle.EXECUTE_TASK, [str(first)]),
        (lifecycle.EXECUTE_MANY_TASK, [str(second), str(third)]),
    ]
