"""The stack across processes: a real uvicorn, a real Celery worker and Flower,
started on free loopback ports and driven as a client would."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import structlog

from backend.kit.celery_app import celery_app
from tests.support.procs import PYTHON, STARTUP_S, free_port, http_ok, python_env, running, wait_for

# The worker (a session fixture in conftest) is shared: its tests go to one xdist worker.
pytestmark = pytest.mark.xdist_group("crossprocess")


@pytest.fixture(scope="module")
def api(database: str, crossprocess_logs: Path) -> Iterator[tuple[str, Path]]:
    port = free_port()
    log = crossprocess_logs / "uvicorn.log"
    argv = [
        PYTHON,
        "-m",
        "uvicorn",
        "backend.main:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
    ]
    with running(argv, env=python_env(LOG__JSON_OUTPUT="true"), log=log) as proc:
        base = f"http://127.0.0.1:{port}"
        wait_for(http_ok(f"{base}/health"), timeout_s=STARTUP_S, what="uvicorn", proc=proc, log=log)
        yield base, log


def test_ready_over_real_http(api: tuple[str, Path]) -> None:
    base, _ = api
    r = httpx.get(f"{base}/health/ready", timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"database": "ok", "redis": "ok", "broker": "ok"}


def test_request_id_is_on_every_log_line_of_a_request(api: tuple[str, Path]) -> None:
    base, log = api
    request_id = f"it-{uuid.uuid4().hex}"
    assert (
        httpx.get(
            f"{base}/health/ready", headers={"X-Request-ID": request_id}, timeout=10
        ).status_code
        == 200
    )
    httpx.get(f"{base}/missing", headers={"X-Request-ID": request_id}, timeout=10)

    def access_lines() -> list[dict[str, object]]:
        return [json.loads(line) for line in log.read_text().splitlines() if request_id in line]

    # The access line is written after the response went out: give it a moment.
    wait_for(
        lambda: any(line.get("status") == 404 for line in access_lines()),
        timeout_s=10,
        what="access log line",
    )
    lines = access_lines()
    # One access line per request, JSON, each carrying the id as a field.
    assert [line["event"] for line in lines].count("request") >= 1
    assert all(line["request_id"] == request_id for line in lines)
    assert any(line.get("status") == 404 for line in lines)


def test_ping_round_trips_through_the_broker(worker_name: str) -> None:
    request_id = f"ping-{uuid.uuid4().hex[:8]}"
    structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        result = celery_app.send_task("system.ping").get(timeout=30)
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
    assert result["pong"] is True
    # The publisher's request id travelled in the message headers into the task.
    assert result["request_id"] == request_id


def test_flower_lists_the_worker_behind_basic_auth(
    worker_name: str, crossprocess_logs: Path
) -> None:
    port = free_port()
    log = crossprocess_logs / "flower.log"
    env = python_env(FLOWER__PORT=str(port), FLOWER__USER="ops", FLOWER__PASSWORD="s3cret-for-test")
    with running([PYTHON, "-m", "workers.flower"], env=env, log=log) as proc:
        base = f"http://127.0.0.1:{port}"
        wait_for(
            lambda: httpx.get(f"{base}/healthcheck", timeout=2).status_code == 200,
            # Generous: under a loaded CI machine Flower's start (Celery, every task
            # module) has been seen to take over a minute.
            timeout_s=150,
            what="flower",
            proc=proc,
            log=log,
        )
        assert httpx.get(f"{base}/api/workers", timeout=5).status_code == 401
        assert httpx.get(f"{base}/api/workers", auth=("ops", "wrong"), timeout=5).status_code == 401

        def listed() -> bool:
            r = httpx.get(
                f"{base}/api/workers",
                params={"refresh": "1"},
                auth=("ops", "s3cret-for-test"),
                timeout=10,
            )
            return r.status_code == 200 and worker_name in r.json()

        wait_for(listed, timeout_s=60, what="worker in flower", proc=proc, log=log)
        # The password is never in the process list.
        assert "s3cret-for-test" not in " ".join(str(a) for a in proc.args)  # type: ignore[union-attr]
