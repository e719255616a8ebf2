"""The one Celery app object.

The API imports it to enqueue tasks by name (it never imports `workers`); the worker,
beat and Flower load it through `workers`, which registers the tasks. Every setting
that keeps runs from being lost or doubled is here and pinned by a test.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Celery, signals
from celery.schedules import crontab
from celery.worker.consumer.consumer import (  # type: ignore[attr-defined]
    COLLECT_SOCKET_TIMEOUT,
)
from celery.worker.consumer.consumer import Consumer as _CeleryConsumer
from kombu import Queue

from backend.config import Settings, get_settings
from backend.kit.logging import REQUEST_ID_KEY, current_request_id, get_logger

log = get_logger(__name__)

QUEUES = ("high_priority", "default", "low_priority")

# Task names are dotted by area; routes go by the area so a new task lands on the
# right queue without touching this table.
ROUTES: dict[str, dict[str, str]] = {
    "workflow.*": {"queue": "high_priority"},
    "system.*": {"queue": "default"},
    "notifications.*": {"queue": "default"},
    "analytics.*": {"queue": "default"},
    "triggers.*": {"queue": "default"},
    "executions.*": {"queue": "default"},
    "maintenance.*": {"queue": "low_priority"},
}


class Consumer(_CeleryConsumer):
    """Celery's consumer, made to survive losing the broker with unacked messages.

    Without this, a Redis restart took the worker's main process down (exit 1,
    `AttributeError: 'NoneType' object has no attribute 'hostname'` in kombu's
    `restore_unacked`) whenever an acks_late task was running while a free slot
    waited in BRPOP. Celery's `on_connection_error_after_connected` calls
    `Connection.collect()`, whose first `Channel.close()` raises on reading the
    interrupted BRPOP and is swallowed, leaving the channel open; `collect()` then
    detaches the transport (`transport.client = None`) anyway. The `close()` that
    follows closes that channel again, now without a transport: restoring its unacked
    messages builds a Redis pool from `transport.client.hostname` and raises an
    AttributeError, which `ignore_errors` does not ignore. (Independent of
    worker_cancel_long_running_tasks_on_connection_loss: that step runs after.)

    The guard finishes closing the channels first, while the transport is attached,
    so `collect()` and `close()` find them closed. Messages that cannot be restored
    with the broker down stay in Redis's unacked index and come back after the
    visibility timeout; the database lease and the reaper recover the runs sooner.
    """

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        if self.connection is not None:
            _close_channels(self.connection)
        super().on_connection_error_after_connected(exc)


def _close_channels(connection: Any) -> None:
    from celery.utils.threads import bound_open_broker_sockets  # type: ignore[attr-defined]

    # A peer that went silent without a reset would block the reads close() makes.
    bound_open_broker_sockets(connection, COLLECT_SOCKET_TIMEOUT)
    transport = getattr(connection, "_transport", None)
    channels = [getattr(connection, "_default_channel", None)]
    channels += list(getattr(transport, "channels", ()))
    for channel in dict.fromkeys(c for c in channels if c is not None):
        # The first close() of a channel reading BRPOP may only end that read (and
        # raise); the second does the rest, restoring unacked messages if it can.
        for _ in range(2):
            if getattr(channel, "closed", True):
                break
            try:
                channel.close()
            except Exception as error:
                log.warning("celery.channel_close_failed", error=repr(error))


def celery_config(settings: Settings) -> dict[str, Any]:
    c = settings.celery
    transport = {
        "visibility_timeout": c.visibility_timeout_s,
        "socket_connect_timeout": settings.redis.socket_connect_timeout_s,
        "socket_timeout": settings.redis.socket_timeout_s,
    }
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        # The same visibility timeout everywhere kombu reads one (celery#4400).
        "broker_transport_options": transport,
        "result_backend_transport_options": dict(transport),
        "broker_connection_retry_on_startup": True,
        # JSON only: pickle from a broker is remote code execution.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Durability: ack after the task finished, give the message back when the
        # worker process dies (SIGKILL, OOM) instead of acking it (celery#1628), and
        # let each process reserve one message at a time so a crash strands nothing.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # If the broker connection drops, a late-ack task will be redelivered; stop
        # the running copy rather than let both run (LESSONS: runs that double).
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Rides out a broker outage instead of exiting (see Consumer above).
        "worker_consumer": f"{__name__}:Consumer",
        # On SIGTERM (with REMAP_SIGTERM=SIGQUIT, as the manifests set) a worker gets
        # this long to finish, then gives its unacked messages back to Redis at once,
        # instead of leaving them to the visibility timeout (hours).
        "worker_soft_shutdown_timeout": 60.0,
        "worker_enable_soft_shutdown_on_idle": True,
        "task_time_limit": c.task_time_limit_s,
        "task_soft_time_limit": c.task_soft_time_limit_s,
        "result_expires": c.result_expires_s,
        "task_queues": [Queue(name, routing_key=name) for name in QUEUES],
        "task_default_queue": "default",
        "task_default_routing_key": "default",
        "task_routes": ROUTES,
        "task_create_missing_queues": False,
        # Events for Flower: started/succeeded/failed from workers, sent from clients.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "worker_concurrency": c.worker_concurrency,
        # Our logging config (structlog) stays in charge inside the worker.
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "beat_schedule": {
            "reap-executions": {
                "task": "executions.reap",
                "schedule": settings.engine.reaper_interval_s,
                # A tick that could not run in time is dropped, not stacked up.
                "options": {"expires": settings.engine.reaper_interval_s},
            },
            "archive-events": {
                "task": "executions.archive_events",
                "schedule": settings.engine.archive_interval_s,
                "options": {"expires": settings.engine.archive_interval_s},
            },
            # One tick fires every due schedule; the database, not beat, remembers what
            # fired (a second beat would find nothing left to fire).
            "dispatch-triggers": {
                "task": "triggers.dispatch_due",
                "schedule": settings.triggers.dispatch_interval_s,
                "options": {"expires": settings.triggers.dispatch_interval_s},
            },
            # Hourly aggregates for the analytics API; a pass rebuilds what changed.
            "aggregate-analytics": {
                "task": "analytics.aggregate",
                "schedule": settings.analytics.aggregate_interval_s,
                "options": {"expires": settings.analytics.aggregate_interval_s},
            },
            # Run-history suggestions of every workflow that ran in the window.
            "recompute-suggestions": {
                "task": "suggestions.recompute",
                "schedule": settings.generate.suggestions_interval_s,
                "options": {"expires": settings.generate.suggestions_interval_s},
            },
            # Open tasks past their deadline expire and wake their runs (issue 16).
            "expire-tasks": {
                "task": "notifications.expire_tasks",
                "schedule": settings.tasks.expire_interval_s,
                "options": {"expires": settings.tasks.expire_interval_s},
            },
            # n8n fleets: one tick sends a sync per instance that is due; the instance
            # row's claim, not beat, keeps two syncs of one instance apart.
            "sync-n8n-instances": {
                "task": "n8n.sync_due",
                "schedule": settings.n8n.sync_interval_s,
                "options": {"expires": settings.n8n.sync_interval_s},
            },
            # n8n environments (issue 18): drift checks of the environments that are
            # due, and one snapshot pass a night (only where a definition changed).
            "n8n-drift": {
                "task": "n8n.drift_due",
                "schedule": settings.n8n.drift_interval_s,
                "options": {"expires": settings.n8n.drift_interval_s},
            },
            "n8n-nightly-snapshots": {
                "task": "n8n.nightly_snapshots",
                "schedule": crontab(minute=0, hour=settings.n8n.nightly_snapshot_hour),
                "options": {"expires": 3600},
            },
            "retention": {
                "task": "maintenance.retention",
                "schedule": settings.maintenance.interval_s,
                "options": {"expires": settings.maintenance.interval_s},
            },
            "purge-expired": {
                "task": "maintenance.purge",
                "schedule": settings.maintenance.interval_s,
                "options": {"expires": settings.maintenance.interval_s},
            },
        },
        "timezone": "UTC",
        "enable_utc": True,
    }


def create_celery_app(settings: Settings) -> Celery:
    app = Celery("orchestration_studio")
    app.conf.update(celery_config(settings))
    return app


celery_app = create_celery_app(get_settings())


@signals.before_task_publish.connect
def _propagate_request_id(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Carry the publishing request's id to the task, so its log lines can be joined."""
    request_id = current_request_id()
    if headers is not None and request_id and REQUEST_ID_KEY not in headers:
        headers[REQUEST_ID_KEY] = request_id


@signals.task_prerun.connect
def _bind_task_context(task: Any = None, task_id: str | None = None, **_: Any) -> None:
    structlog.contextvars.clear_contextvars()
    request_id = getattr(task.request, REQUEST_ID_KEY, None) if task is not None else None
    structlog.contextvars.bind_contextvars(
        task_id=task_id, task_name=getattr(task, "name", None), request_id=request_id or task_id
    )


@signals.task_postrun.connect
def _clear_task_context(**_: Any) -> None:
    structlog.contextvars.clear_contextvars()
