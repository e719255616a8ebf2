"""Real subprocesses for cross-process tests: started on free loopback ports, stopped
(with everything they started) when the test is done."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import httpx
import psutil

from tests.support.paths import ROOT

# How long a server or worker a test starts may take to answer: a start-up bound, not a
# performance figure. Importing the app costs several seconds of CPU (the anthropic
# and mcp SDKs), and on a 2-core machine shared with other suites it took 20-60 s.
STARTUP_S = 180.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    check: Callable[[], bool],
    *,
    timeout_s: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-4000:] if log and log.exists() else ""
            raise AssertionError(f"{what}: process exited with {proc.returncode}\n{tail}")
        try:
            if check():
                return
        except Exception:  # noqa: S110 - not ready yet is an exception here
            pass
        time.sleep(0.2)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    raise AssertionError(f"{what}: not ready within {timeout_s} s\n{tail}")


async def eventually(
    check: Callable[[], bool | Awaitable[bool]],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.02,
) -> None:
    """`wait_for` for async tests: polls without blocking the event loop (the code
    under test often runs as a task on the same loop). `check` may be async."""
    deadline = time.monotonic() + timeout_s
    while True:
        outcome = check()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        await asyncio.sleep(interval_s)


def http_ok(url: str, *, auth: tuple[str, str] | None = None) -> Callable[[], bool]:
    def check() -> bool:
        return httpx.get(url, timeout=2, auth=auth).status_code == 200

    return check


def descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def alive(procs: Sequence[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


@contextlib.contextmanager
def running(
    argv: Sequence[str],
    *,
    env: dict[str, str],
    log: Path,
    stop_signal: int = signal.SIGTERM,
    grace_s: float = 15,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run argv in its own process group with output in `log`; stop it and its whole
    tree afterwards, and fail the test if anything is left running."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(argv), env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, process_group=0
        )
    seen: dict[int, psutil.Process] = {}
    try:
        yield proc
    finally:
        for p in descendants(proc.pid):
            seen.setdefault(p.pid, p)
        if proc.poll() is None:
            proc.send_signal(stop_signal)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        _, still = psutil.wait_procs(alive(list(seen.values())), timeout=5)
        for p in still:
            with contextlib.suppress(psutil.Error):
                p.kill()


def python_env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(overrides)
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable
