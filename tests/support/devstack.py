"""Driving the development launcher (scripts/devstack.py) as a developer does: its
environment without the test's own settings, and Ctrl-C to its process group."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psutil

from tests.support.paths import ROOT
from tests.support.procs import alive

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
    """Ctrl-C as a terminal sends it: to the launcher's whole process group. Fails if
    any process of `tree` is left running."""
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
