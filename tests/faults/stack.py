"""The pieces of a real stack the fault suite breaks on purpose: its own PostgreSQL and
Valkey (restartable on the same port and data), Celery workers it can SIGKILL and start
again, beats, and a loopback HTTP target that records every side-effect request."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from scripts.devstack import Postgres, Valkey
from tests.support.paths import ROOT
from tests.support.procs import PYTHON, alive, descendants, free_port


@dataclass(frozen=True)
class Hit:
    at: float  # time.monotonic() of the request's arrival
    execution: str
    node: str
    idempotency_key: str | None


@dataclass
class Target:
    """Answers `GET /hit?e=<execution>&n=<node>&d=<seconds>` after d seconds."""

    port: int = field(default_factory=free_port)
    hits: list[Hit] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> FastAPI:
        import asyncio

        app = FastAPI()

        @app.get("/hit")
        async def hit(request: Request) -> JSONResponse:
            q = request.query_params
            self.hits.append(
                Hit(time.monotonic(), q["e"], q["n"], request.headers.get("idempotency-key"))
            )
            await asyncio.sleep(float(q.get("d", "0")))
            return JSONResponse({"node": q["n"], "ok": True})

        return app


@contextlib.contextmanager
def serve(target: Target) -> Iterator[Target]:
    server = uvicorn.Server(
        uvicorn.Config(target.app(), host="127.0.0.1", port=target.port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("target server did not start")
        time.sleep(0.02)
    try:
        yield target
    finally:
        server.should_exit = True
        thread.join(10)


class Proc:
    """A Celery worker or beat in its own process group, killable and startable again
    under the same name; its output is appended to one log across restarts."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.argv, self.env, self.log = name, argv, env, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: dict[int, psutil.Process] = {}

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                process_group=0,
            )  # fmt: skip

    def pids(self) -> set[int]:
        """The main process and its pool children, as they are now."""
        assert self.proc is not None
        tree = [self.proc.pid, *(p.pid for p in descendants(self.proc.pid))]
        for p in descendants(self.proc.pid):
            self.seen.setdefault(p.pid, p)
        return set(tree)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sigkill(self) -> None:
        """The machine dies: every process of the tree at once, no goodbye."""
        assert self.proc is not None
        self.pids()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            self.pids() if self.proc.poll() is None else None
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(5)
        _, still = psutil.wait_procs(alive(list(self.seen.values())), timeout=5)
        for p in still:
            with contextlib.suppress(psutil.Error):
                p.kill()


def worker(name: str, env: dict[str, str], logs: Path, concurrency: int = 2) -> Proc:
    argv = [PYTHON, "-m", "celery", "-A", "workers", "worker", "--loglevel=INFO",
            "--queues=high_priority,default,low_priority", f"--concurrency={concurrency}",
            f"--hostname={name}@127.0.0.1", "--without-mingle", "--without-gossip"]  # fmt: skip
    return Proc(name, argv, env, logs / f"{name}.log")


def beat(name: str, env: dict[str, str], logs: Path) -> Proc:
    argv = [PYTHON, "-m", "celery", "-A", "workers", "beat", "--loglevel=INFO",
            f"--schedule={logs / (name + '-schedule')}"]  # fmt: skip
    return Proc(name, argv, env, logs / f"{name}.log")


def restart(server: Postgres | Valkey, down_s: float) -> tuple[float, float]:
    """Stop the server, keep it down for `down_s`, start it on the same port and data.
    Returns (monotonic time it went down, time it answered again)."""
    server.stop()
    down = time.monotonic()
    time.sleep(down_s)
    server.start()
    return down, time.monotonic()


__all__ = ["Hit", "Postgres", "Proc", "Target", "Valkey", "beat", "restart", "serve", "worker"]
