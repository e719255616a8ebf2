"""What beat fires, how often, and where each periodic task lands."""

from __future__ import annotations

from backend.config import Settings
from backend.kit.celery_app import celery_app, celery_config


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
