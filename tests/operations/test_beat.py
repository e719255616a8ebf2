"""What beat fires, how often, and where each periodic task lands."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery.beat import Scheduler

from backend.config import Settings
from backend.kit.celery_app import QUEUES, celery_app, celery_config
from tests.support.procs import wait_for


def test_beat_fires_the_schedule_tick_maintenance_and_the_reaper(settings: Settings) -> None:
    schedule = {e["task"]: e for e in celery_config(settings)["beat_schedule"].values()}
    assert set(schedule) >= {
        "executions.reap",
        "triggers.dispatch_due",
        "maintenance.retention",
        "maintenance.purge",
    }
    tick = schedule["triggers.dispatch_due"]
    assert tick["schedule"] == settings.triggers.dispatch_interval_s == 15
    # A tick that could not run in time is dropped, not stacked behind the next one.
    assert tick["options"]["expires"] == tick["schedule"]
    assert schedule["maintenance.retention"]["schedule"] == settings.maintenance.interval_s


def test_periodic_tasks_are_routed_by_their_names(settings: Settings) -> None:
    import workers  # noqa: F401 - registers the tasks

    router = celery_app.amqp.router
    queue = {
        name: router.route({}, name)["queue"].name
        for name in (
            "triggers.dispatch_due",
            "notifications.deliver",
            "maintenance.retention",
            "maintenance.purge",
            "workflow.execute",
        )
    }
    assert queue == {
        "triggers.dispatch_due": "default",
        "notifications.deliver": "default",
        "maintenance.retention": "low_priority",
        "maintenance.purge": "low_priority",
        "workflow.execute": "high_priority",
    }
    assert {"triggers.dispatch_due", "notifications.deliver", "maintenance.purge"} <= set(
        celery_app.tasks
    )


@pytest.mark.xdist_group("crossprocess-b")
def test_every_periodic_task_runs_in_a_real_worker_as_beat_sends_it(
    worker_name: str, crossprocess_logs: Path
) -> None:
    """What beat sends, sent by beat's own code (the scheduler's apply_async: the
    schedule's options and headers) through the broker to a real worker process; each
    result must come back a success and the worker's log must show no error for it.
    A test that called the task functions directly let archive_events fail on every
    tick in production (LESSONS)."""
    log = crossprocess_logs / "worker.log"
    start = log.stat().st_size
    scheduler = Scheduler(celery_app, lazy=True)
    scheduler.setup_schedule()
    entries = dict(scheduler.schedule)
    assert {e.task for e in entries.values()} >= {
        "executions.reap",
        "executions.archive_events",
        "triggers.dispatch_due",
        "maintenance.retention",
        "maintenance.purge",
    }
    # One at a time, each once the worker is idle: beat sends its ticks with an
    # `expires` as short as their interval (the reaper's: 3 s), so a dozen sent at once
    # to this one-slot worker expired behind the slower ones (REVOKED 'expired'). Idle,
    # not merely "the last one answered": a tick that fans out (n8n.sync_due sends one
    # sync per instance, and instances other tests left behind take seconds to find
    # unreachable) leaves work queued after its own answer, and the reaper's tick expired
    # behind it in CI.
    inspect = celery_app.control.inspect(destination=[worker_name], timeout=2)

    def idle() -> bool:
        with celery_app.connection_for_read() as conn:
            channel: Any = conn.default_channel  # kombu's StdChannel type omits queue_declare
            # Declared (as the worker already did): Redis has no key for an empty
            # queue, so a passive declare of one answers "not found".
            if any(channel.queue_declare(q).message_count for q in QUEUES):
                return False
        busy = [inspect.active(), inspect.reserved()]
        if not all(reply is not None and not any(reply.values()) for reply in busy):
            return False
        # A task held back by a countdown (a notification's retry, a run's requeue) is
        # in neither list; one due soon would take the slot in the middle of the loop.
        scheduled = inspect.scheduled()
        if scheduled is None:
            return False
        soon = datetime.now(UTC) + timedelta(seconds=30)
        etas = [datetime.fromisoformat(t["eta"]) for tasks in scheduled.values() for t in tasks]
        return not any((eta if eta.tzinfo else eta.replace(tzinfo=UTC)) < soon for eta in etas)

    # The check sees a task held back by a countdown once the worker holds it. From an
    # idle worker (work other tests left queued, or a reply of its remote control that
    # came late, kept this check from seeing the ping within 10 s once in CI).
    wait_for(idle, timeout_s=120, what="an idle worker before the held-back ping")
    # Due in 15 s: still held back when the check below looks, however slowly the worker
    # came to hold it (up to 12 s).
    held = celery_app.send_task("system.ping", countdown=15)
    wait_for(
        lambda: any((inspect.scheduled() or {}).values()), timeout_s=12, what="the held-back ping"
    )  # fmt: skip
    assert not idle()
    held.get(timeout=60)

    sent = {}
    outcomes = {}
    for name, entry in entries.items():
        wait_for(idle, timeout_s=120, what=f"an idle worker before {name}")
        result = sent[name] = scheduler.apply_async(entry, advance=False)
        result.get(timeout=120, propagate=False)
        outcomes[name] = (result.status, None if result.successful() else repr(result.result))
    assert all(status == "SUCCESS" for status, _ in outcomes.values()), outcomes

    ids = {result.id for result in sent.values()}

    def all_logged() -> bool:
        text = log.read_bytes()[start:].decode(errors="replace")
        return all(f"[{task_id}] succeeded" in text for task_id in ids)

    # The worker writes its "succeeded" line just after storing the result.
    wait_for(all_logged, timeout_s=10, what="the worker's log lines for beat's tasks")
    text = log.read_bytes()[start:].decode(errors="replace")
    errors = [
        line
        for line in text.splitlines()
        if any(mark in line for mark in ("[error", "[critical", "Traceback", "raised unexpected"))
    ]
    assert errors == [], "\n".join(errors)
