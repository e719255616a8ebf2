"""The metrics, and how they are exposed.

prometheus-client keeps one process's numbers; with several processes (uvicorn
--workers, Celery's prefork pool) each writes its own files under
PROMETHEUS_MULTIPROC_DIR and the exposition adds them up. That variable must be set
before prometheus_client is first imported, which is why this module decides it at the
top: a Celery worker without one gets a fresh directory of its own (its pool children
inherit it), so the worker's one endpoint reports the pool, not one child.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any


def _celery_worker() -> bool:
    # Decided from the command line: there is no app or signal yet at import time.
    argv = " ".join(sys.argv)
    return "celery" in argv and " worker" in argv


if not os.environ.get("PROMETHEUS_MULTIPROC_DIR") and _celery_worker():
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="orch-metrics-")

from prometheus_client import (  # noqa: E402 - after the directory is decided
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client import values as _values  # noqa: E402
from prometheus_client.core import GaugeMetricFamily  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402

# `celery worker` loads its CLI plugins (Flower's among them) before the app, and they
# import prometheus_client first: its value class was chosen without the directory.
# Metrics read the class when they are made, so choosing again here is enough.
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _values.ValueClass = _values.get_value_class()  # type: ignore[no-untyped-call]

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
PREFIX = "orch"

# API -------------------------------------------------------------------------------------

HTTP_REQUESTS = Counter(
    f"{PREFIX}_http_requests_total",
    "HTTP requests by route template, method and status",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    f"{PREFIX}_http_request_duration_seconds",
    "HTTP request latency by route template and method",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
HOT_READS = Counter(
    f"{PREFIX}_api_hot_reads_total",
    "Hot GET requests (backend/kit/hotpath.py): answered there, or left to the route",
    ["outcome"],
)
WEBSOCKETS = Gauge(
    f"{PREFIX}_websocket_connections",
    "Open WebSocket connections",
    ["route"],
    multiprocess_mode="livesum",
)

# Runs (workers, and the API for runs it ends itself: a cancel before a worker took it) --

RUNS_STARTED = Counter(
    f"{PREFIX}_runs_started_total", "Runs handed to a worker (a redelivered message counts again)"
)
RUNS_FINISHED = Counter(f"{PREFIX}_runs_finished_total", "Runs that ended, by status", ["status"])
RUN_DURATION = Histogram(
    f"{PREFIX}_run_duration_seconds",
    "Run duration (claimed to ended), by status",
    ["status"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
NODE_DURATION = Histogram(
    f"{PREFIX}_node_duration_seconds",
    "Node attempt duration by node type and status",
    ["type", "status"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
)
RETRIES = Counter(f"{PREFIX}_node_retries_total", "Node attempts past the first", ["type"])
TOKENS = Counter(f"{PREFIX}_ai_tokens_total", "Model tokens by model and kind", ["model", "kind"])
COST = Counter(f"{PREFIX}_ai_cost_usd_total", "Model cost in USD by model", ["model"])
LEASE_LOSSES = Counter(f"{PREFIX}_lease_losses_total", "Runs a worker stopped: lease lost")
REAPER = Counter(f"{PREFIX}_reaper_actions_total", "Runs the reaper handed on", ["by"])
QUOTA_REFUSALS = Counter(f"{PREFIX}_quota_refusals_total", "Work refused by a quota", ["quota"])


class LogEvents(logging.Handler):
    """Counts the engine's own log events (lease lost, runs reaped) instead of hooks in
    the engine: the events are already written exactly where those things happen."""

    def emit(self, record: logging.LogRecord) -> None:
        event = record.msg if isinstance(record.msg, dict) else None
        if event is None:
            return
        name = event.get("event")
        if name == "execution.lease_lost":
            LEASE_LOSSES.inc()
        elif name == "executions.reaped":
            REAPER.labels(by=str(event.get("by", "beat"))).inc(int(event.get("count", 1) or 1))


def watch_log_events() -> None:
    root = logging.getLogger()
    if not any(isinstance(h, LogEvents) for h in root.handlers):
        root.addHandler(LogEvents(level=logging.INFO))


class QueueDepth(Collector):
    """Messages waiting per Celery queue, read from the broker at scrape time."""

    def __init__(self, broker_url: str, queues: tuple[str, ...]) -> None:
        self.broker_url = broker_url
        self.queues = queues

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import redis

        family = GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "Messages waiting in each Celery queue", labels=["queue"]
        )
        client = redis.Redis.from_url(self.broker_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            for queue in self.queues:
                # kombu keeps one list per priority step: the queue's name, then
                # name + "\x06\x16" + step for steps above 0.
                keys = [queue] + [f"{queue}\x06\x16{step}" for step in (3, 6, 9)]
                family.add_metric([queue], float(sum(client.llen(k) for k in keys)))
        except redis.RedisError:
            return
        finally:
            client.close()
        yield family


class PoolInUse(Collector):
    """Database connections checked out of this process's pool."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            f"{PREFIX}_db_pool_in_use", "Database connections in use", labels=["pid"]
        )
        pool = self.engine.sync_engine.pool
        family.add_metric([str(os.getpid())], float(pool.checkedout()))
        yield family


def registry(*extra: Collector) -> CollectorRegistry:
    """What an endpoint exposes: every process's numbers (multiprocess) or this one's,
    plus collectors read at scrape time."""
    if MULTIPROCESS:
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)  # type: ignore[no-untyped-call]
    else:
        reg = CollectorRegistry()
        for collector in list(REGISTRY._collector_to_names):
            reg.register(collector)
    for collector in extra:
        reg.register(collector)
    return reg


def render(reg: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(reg), CONTENT_TYPE_LATEST
