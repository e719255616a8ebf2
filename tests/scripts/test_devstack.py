"""The development launcher behind `make run` / `make test`: embedded PostgreSQL and
Valkey when no URLs are given, and nothing left running after Ctrl-C."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest
import redis

from tests.support.devstack import DEVSTACK, interrupt_and_wait, launcher_env
from tests.support.paths import ROOT
from tests.support.procs import PYTHON, descendants, free_port, http_ok, wait_for

# tests/operations/test_launcher imports these from here (it was being edited elsewhere
# when they moved to tests.support.devstack).
__all__ = ["DEVSTACK", "interrupt_and_wait", "launcher_env"]


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
        # The child writes the file once its servers are up; read it when it is whole.
        wait_for(
            lambda: bool(json.loads(out.read_text())),
            timeout_s=90,
            what="devstack exec",
            proc=proc,
            log=log,
        )
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

    def remember_and(check: Callable[[], bool]) -> Callable[[], bool]:
        def inner() -> bool:
            for p in descendants(proc.pid):
                tree.setdefault(p.pid, p)
            return bool(check())

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
        # Kept on purpose: nothing marks "every process of the stack has started its
        # children" (prefork pool, Flower's), and the Ctrl-C check below can only find
        # what was seen; a second lets late children appear before the last look.
        time.sleep(1)
        remember_and(lambda: True)()
    finally:
        code = interrupt_and_wait(proc, tree)
    assert code == 130, code
    text = log.read_text()
    assert "PostgreSQL stopped" in text and "Valkey stopped" in text
    assert not (tmp_path / "data" / "devstack.json").exists()
