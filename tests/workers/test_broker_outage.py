"""A worker rides out a broker outage: Redis restarted under a real worker process
while its tasks run, the worker stays up, reconnects and runs what is sent after."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from backend.config import Settings
from backend.kit.celery_app import create_celery_app
from scripts.devstack import Valkey
from tests.support.procs import PYTHON, python_env, running, wait_for

# Its own Redis server, restarted under the worker: nothing else may share it.
pytestmark = pytest.mark.xdist_group("broker_outage")

RESTARTS = 3


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Valkey]:
    server = Valkey(tmp_path / "valkey", ephemeral=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def client(url: str) -> Celery:
    # A fresh client per phase: a result consumer that saw the server go away gives up.
    return create_celery_app(Settings(redis_url=url))


def test_worker_survives_redis_restarts_with_tasks_in_flight(
    redis_server: Valkey, tmp_path: Path
) -> None:
    name = f"outage-{uuid.uuid4().hex[:8]}@127.0.0.1"
    log = tmp_path / "worker.log"
    # Three slots, two busy: the crash needed an unacked (acks_late) task running
    # while a free slot waited in BRPOP when the connection dropped.
    argv = [PYTHON, "-m", "celery", "-A", "workers", "worker", "--loglevel=INFO",
            "--queues=high_priority,default,low_priority", "--concurrency=3",
            f"--hostname={name}", "--without-mingle", "--without-gossip",
            "--include=tests.workers.slow_tasks"]  # fmt: skip
    with running(argv, env=python_env(REDIS_URL=redis_server.url), log=log) as proc:

        def answers() -> bool:
            app = client(redis_server.url)
            try:
                return bool(app.control.ping(destination=[name], timeout=0.5))
            finally:
                app.close()

        wait_for(answers, timeout_s=120, what="celery worker", proc=proc, log=log)
        for round_ in range(RESTARTS):
            app = client(redis_server.url)
            try:
                sent = {app.send_task("test.sleep", args=[6.0]).id for _ in range(2)}

                def both_running(app: Celery = app, sent: set[str] = sent) -> bool:
                    active = app.control.inspect(destination=[name], timeout=1).active() or {}
                    return sent <= {t["id"] for t in active.get(name, [])}

                wait_for(both_running, timeout_s=30, what="tasks running", proc=proc, log=log)
            finally:
                app.close()
            redis_server.stop()
            # Down long enough for the worker to notice and start retrying.
            time.sleep(1.5)
            assert proc.poll() is None, log.read_text()[-4000:]
            redis_server.start()
            wait_for(
                answers, timeout_s=60, what=f"reconnect after restart {round_ + 1}",
                proc=proc, log=log,
            )  # fmt: skip
        assert proc.poll() is None, log.read_text()[-4000:]
        app = client(redis_server.url)
        try:
            assert app.send_task("system.ping").get(timeout=30)["pong"] is True
            assert app.send_task("test.sleep", args=[0.1]).get(timeout=30) == 0.1
        finally:
            app.close()
        text = log.read_text()
        assert text.count("Connection to broker lost") >= RESTARTS
        assert "Unrecoverable error" not in text
        assert proc.poll() is None
