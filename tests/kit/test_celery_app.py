"""The durable Celery settings. If one of these changes, runs can be lost or doubled:
change the test only together with the reason (see LESSONS.md)."""

from __future__ import annotations

from backend.config import get_settings
from backend.kit.celery_app import QUEUES, celery_app


def test_tasks_are_acked_late_and_rejected_when_the_worker_dies() -> None:
    conf = celery_app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is True


def test_visibility_timeout_is_consistent_and_outlasts_every_time_limit() -> None:
    conf = celery_app.conf
    visibility = conf.broker_transport_options["visibility_timeout"]
    assert conf.result_backend_transport_options["visibility_timeout"] == visibility
    assert visibility > conf.task_time_limit > conf.task_soft_time_limit
    assert get_settings().celery.max_countdown_s == visibility - conf.task_time_limit > 0


def test_only_json_is_accepted() -> None:
    conf = celery_app.conf
    assert conf.task_serializer == "json"
    assert conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert list(conf.result_accept_content) == ["json"]


def test_three_queues_with_routes_by_task_area() -> None:
    conf = celery_app.conf
    assert (
        {q.name for q in conf.task_queues}
        == set(QUEUES)
        == {"high_priority", "default", "low_priority"}
    )
    assert conf.task_default_queue == "default"
    router = celery_app.amqp.router

    def queue_of(name: str) -> str:
        return str(router.route({}, name)["queue"].name)

    assert queue_of("workflow.execute") == "high_priority"
    assert queue_of("system.ping") == "default"
    assert queue_of("maintenance.retention") == "low_priority"
    assert queue_of("unrouted.task") == "default"


def test_events_are_on_for_flower() -> None:
    assert celery_app.conf.worker_send_task_events is True
    assert celery_app.conf.task_send_sent_event is True
