"""The real-n8n suite runs only under `make test-n8n` (ORCH_REAL_N8N=1): it installs n8n
from the npm registry into a cache outside the repo (once: ~3 GB, ~6-8 min), starts it on
loopback with a fresh database, and takes a minute or more per run."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.n8n.real.server import RealN8n, install, running

if os.environ.get("ORCH_REAL_N8N") != "1":
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def real_n8n() -> Iterator[RealN8n]:
    install()
    with running() as n8n:
        yield n8n
