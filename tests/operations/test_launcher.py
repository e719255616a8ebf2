"""`make run` keeps the stack up when one process dies: the launcher names the dead
process and starts it again, instead of honcho stopping everything."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.scripts.test_devstack import DEVSTACK, interrupt_and_wait, launcher_env
from tests.support.paths import ROOT
from tests.support.procs import PYTHON, descendants, free_port, http_ok, wait_for


def _main_processes(root: int, marker: str) -> list[psutil.Process]:
    """The supervised process itself (a child of `supervise`), not its pool children."""
    out = []
    for p in descendants(root):
        try:
            parent = p.parent()
            if (
                marker in " ".join(p.cmdline())
                and parent
                and "supervise" in " ".join(parent.cmdline())
            ):
                out.append(p)
        except psutil.Error:
            continue
    return out


@pytest.mark.xdist_group("devstack-run")
def test_a_worker_killed_under_make_run_is_named_and_restarted(tmp_path: Path) -> None:
    port = free_port()
    env = launcher_env(
        tmp_path, PORT=str(port), FLOWER__PORT=str(free_port()), FLOWER__PASSWORD="run-test-pw"
    )
    log = tmp_path / "run.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [PYTHON, DEVSTACK, "run"], env=env, cwd=ROOT, stdout=sink,
            stderr=subprocess.STDOUT, process_group=0,
        )  # fmt: skip
    tree: dict[int, psutil.Process] = {}

    def remember() -> None:
        for p in descendants(proc.pid):
            tree.setdefault(p.pid, p)

    try:
        ready = http_ok(f"http://127.0.0.1:{port}/health/ready")
        wait_for(ready, timeout_s=120, what="make run", proc=proc, log=log)
        wait_for(
            lambda: bool(_main_processes(proc.pid, "celery -A workers worker")),
            timeout_s=60, what="worker process", proc=proc, log=log,
        )  # fmt: skip
        remember()
        (worker,) = _main_processes(proc.pid, "celery -A workers worker")
        (web,) = _main_processes(proc.pid, "uvicorn")
        # The worker dies as under the OOM killer: its whole process group, no goodbye.
        os.killpg(worker.pid, signal.SIGKILL)

        def restarted() -> bool:
            remember()
            again = _main_processes(proc.pid, "celery -A workers worker")
            return bool(again) and again[0].pid != worker.pid

        wait_for(restarted, timeout_s=60, what="worker restarted", proc=proc, log=log)
        text = log.read_text()
        assert "worker exited unexpectedly (code -9); restarting it" in text
        # The rest of the stack never noticed: same API process, still ready.
        assert web.is_running()
        assert httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=10).status_code == 200
        assert "stopped (rc=" not in text
        time.sleep(1)
        remember()
    finally:
        code = interrupt_and_wait(proc, tree)
    assert code == 130, code
