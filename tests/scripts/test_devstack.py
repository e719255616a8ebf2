"""The development launcher behind `make run` / `make test`: embedded PostgreSQL and
Valkey when no URLs are given, and nothing left running after Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest
import redis

from tests.support.paths import ROOT
from tests.support.procs import PYTHON, alive, descendants, free_port, http_ok, wait_for

DEVSTACK = str(ROOT / "scripts" / "devstack.py")


def launcher_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    # The test's own per-worker settings must not leak into the stack under test.
    for key in ("ENVIRONMENT", "PYTEST_XDIST_WORKER", "PYTEST_CURRENT_TEST"):
        env.pop(key, None)
    env.update(DEVSTACK_DATA_DIR=str(tmp_path / "data"), PYTHONUNBUFFERED="1", **extra)
    return env


def interrupt_and_wait(
    proc: subprocess.Popen[bytes], tree: dict[int, psutil.Process], timeout_s: float = 60
) -> int:
    """Ctrl-C as a terminal sends it: to the launcher's whole process group."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.wait(timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        leftover = alive(list(tree.values()))
        for p in leftover:
            p.kill()
        assert leftover == [], f"left running after Ctrl-C: {[p.pid for p in leftover]}"


def test_exec_starts_embedded_servers_and_stops_them(tmp_path: Path) -> None:
    out = tmp_path / "urls.json"
    child = (
        "import json, os, sys, time; "
        "urls = {'db': os.environ['DATABASE_URL'], 'redis': os.environ['REDIS_URL']}; "
        "json.dump(urls, open(sys.argv[1], 'w')); "
        "time.sleep(120)"
    )
    log = tmp_path / "devstack.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [PYTHON, DEVSTACK, "exec", "--", PYTHON, "-c", child, str(out)],
            env=launcher_env(tmp_path),
            stdout=sink,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
    tree: dict[int, psutil.Process] = {}
    try:
        wait_for(out.exists, timeout_s=90, what="devstack exec", proc=proc, log=log)
        time.sleep(0.2)
        urls = json.loads(out.read_text())
        for p in descendants(proc.pid):
            tree[p.pid] = p
        names = {p.name() for p in tree.values()}
        assert "postgres" in names
        assert any("valkey" in n for n in names)
        with psycopg.connect(urls["db"]) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert redis.Redis.from_url(urls["redis"]).ping() is True
        # Data lives where DEVSTACK_DATA_DIR says, so it survives a restart.
        assert (tmp_path / "data" / "pg" / "PG_VERSION").exists()
    finally:
        interrupt_and_wait(proc, tree)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(urls["db"], connect_timeout=2)


@pytest.mark.xdist_group("devstack-run")
def test_make_run_serves_ready_and_flower_then_stops_cleanly(tmp_path: Path) -> None:
    """What `make run` does, end to end: migrations, web, worker, beat and Flower on
    embedded servers; /health/ready is 200, Flower lists the worker; Ctrl-C leaves
    no process behind."""
    port, flower_port = free_port(), free_port()
    env = launcher_env(
        tmp_path, PORT=str(port), FLOWER__PORT=str(flower_port), FLOWER__PASSWORD="run-test-pw"
    )
    log = tmp_path / "run.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [PYTHON, DEVSTACK, "run"],
            env=env,
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
    tree: dict[int, psutil.Process] = {}

    def remember_and(check: object) -> object:
        def inner() -> bool:
            for p in descendants(proc.pid):
                tree.setdefault(p.pid, p)
            return bool(check())  # type: ignore[operator]

        return inner

    try:
        started = time.monotonic()
        wait_for(
            remember_and(http_ok(f"http://127.0.0.1:{port}/health/ready")),
            timeout_s=90,
            what="make run: /health/ready",
            proc=proc,
            log=log,
        )

        def flower_lists_worker() -> bool:
            r = httpx.get(
                f"http://127.0.0.1:{flower_port}/api/workers",
                params={"refresh": "1"},
                auth=("admin", "run-test-pw"),
                timeout=10,
            )
            return r.status_code == 200 and any(name.startswith("worker@") for name in r.json())

        wait_for(
            remember_and(flower_lists_worker),
            timeout_s=60,
            what="make run: worker in Flower",
            proc=proc,
            log=log,
        )
        assert time.monotonic() - started < 90
        text = log.read_text()
        assert f"http://127.0.0.1:{port}/docs" in text
        assert f"http://127.0.0.1:{flower_port}" in text
        assert "beat" in text
        # A second command (`make migrate` while `make run` is up) attaches to the
        # running servers instead of starting a second PostgreSQL on the same data.
        show_url = "import os; print(os.environ['DATABASE_URL'])"
        attached = subprocess.run(
            [PYTHON, DEVSTACK, "exec", "--", PYTHON, "-c", show_url],
            env=env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        state = json.loads((tmp_path / "data" / "devstack.json").read_text())
        assert attached.stdout.strip() == state["DATABASE_URL"]
        assert "attaching" in attached.stderr
        time.sleep(1)
        remember_and(lambda: True)()
    finally:
        code = interrupt_and_wait(proc, tree)
    assert code == 130, code
    text = log.read_text()
    assert "PostgreSQL stopped" in text and "Valkey stopped" in text
    assert not (tmp_path / "data" / "devstack.json").exists()
