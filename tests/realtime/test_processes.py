"""Several API processes (WEB_CONCURRENCY, or several pods): each runs its own hub, and
each follows every run, whichever process admitted it; a sign-out in one process is
refused by the other within the principal cache's bound (README: the API's speed)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backend.config import Settings
from tests.realtime.test_streams import assert_contiguous, follow, seqs, slow_flow, start
from tests.support.crossprocess import signed_in_owner, workflow
from tests.support.procs import PYTHON, STARTUP_S, free_port, http_ok, python_env, running, wait_for
from tests.support.target import Target, http_target

pytestmark = [pytest.mark.xdist_group("crossprocess-b"), pytest.mark.usefixtures("worker_name")]

TTL_S = 1.0


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    with http_target() as t:
        yield t


@pytest.fixture(scope="module")
def two_apis(database: str, crossprocess_logs: Path) -> Iterator[tuple[str, str]]:
    """Two uvicorn processes on one database and one Redis, as two pods (or two
    `--workers`) are."""
    bases: list[str] = []
    env = python_env(AUTH__PRINCIPAL_CACHE_TTL_S=str(TTL_S))
    with (
        running(
            [PYTHON, "-m", "uvicorn", "backend.main:app", "--port", str(p1 := free_port())],
            env=env,
            log=crossprocess_logs / "uvicorn-a.log",
        ) as a,
        running(
            [PYTHON, "-m", "uvicorn", "backend.main:app", "--port", str(p2 := free_port())],
            env=env,
            log=crossprocess_logs / "uvicorn-b.log",
        ) as b,
    ):
        for port, proc, name in ((p1, a, "a"), (p2, b, "b")):
            base = f"http://127.0.0.1:{port}"
            log = crossprocess_logs / f"uvicorn-{name}.log"
            wait_for(
                http_ok(f"{base}/health"), timeout_s=STARTUP_S, what="uvicorn", proc=proc, log=log
            )
            bases.append(base)
        yield bases[0], bases[1]


async def test_each_process_streams_a_run_the_other_admitted(
    two_apis: tuple[str, str], database: str, settings: Settings, target: Target
) -> None:
    a, b = two_apis
    owner = signed_in_owner(database, settings)
    # Slow enough that both followers are connected before the run ends, even on a
    # loaded machine (with 0.5 s, one connected after the end once and got only the
    # snapshot of a finished run).
    wf = workflow(a, owner, slow_flow(target, 3.0))
    execution_id = start(a, owner, wf)
    (on_a, code_a), (on_b, code_b) = await asyncio.gather(
        follow(a, owner, execution_id), follow(b, owner, execution_id)
    )
    assert (code_a, code_b) == (1000, 1000)
    for messages in (on_a, on_b):
        assert messages[0]["type"] == "snapshot"
        assert_contiguous(seqs(messages), messages[0]["seq"] + 1)
        assert (messages[-1]["type"], messages[-1]["status"]) == ("execution.status", "completed")
    # The same story from both: the events come from the run's log, not the process.
    assert [m["seq"] for m in on_a[-3:]] == [m["seq"] for m in on_b[-3:]]


def test_a_sign_out_in_one_process_is_refused_by_the_other_within_the_bound(
    two_apis: tuple[str, str], database: str, settings: Settings
) -> None:
    a, b = two_apis
    owner = signed_in_owner(database, settings)
    # Both processes have the principal cached.
    for base in (a, b):
        assert httpx.get(f"{base}/api/v1/auth/me", headers=owner).status_code == 200
    assert httpx.post(f"{a}/api/v1/auth/logout", headers=owner).status_code == 204
    assert httpx.get(f"{a}/api/v1/auth/me", headers=owner).status_code == 401
    started = time.monotonic()
    while httpx.get(f"{b}/api/v1/auth/me", headers=owner).status_code != 401:
        assert time.monotonic() - started <= TTL_S + 2.0, "process b still accepts the session"
        time.sleep(0.05)
