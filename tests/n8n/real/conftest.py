"""The real-n8n suite runs only under `make test-n8n` (ORCH_REAL_N8N=1): it installs n8n
from the npm registry into a cache outside the repo (once: ~3 GB, ~6-8 min), starts it on
loopback with a fresh database (a second one, `second_n8n`, when a test asks for two),
and takes a minute or more per run."""

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


@pytest.fixture(scope="session")
def second_n8n(real_n8n: RealN8n) -> Iterator[RealN8n]:
    """Another real n8n (own port, own database, own owner and key) beside `real_n8n`:
    environments, promotions and drift run between two instances."""
    with running() as n8n:
        yield n8n


@pytest.fixture(scope="session")
def n8n_pair(real_n8n: RealN8n, second_n8n: RealN8n) -> tuple[RealN8n, RealN8n]:
    """(source, target): two real instances on loopback."""
    return real_n8n, second_n8n
