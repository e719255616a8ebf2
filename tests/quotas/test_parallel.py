"""Quotas across processes: an operator sets a limit with `python -m backend.quotas`, and
a burst of parallel starts against a real uvicorn passes it by not one run."""

from __future__ import annotations

import json
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support.paths import ROOT
from tests.support.procs import PYTHON, python_env

pytestmark = pytest.mark.xdist_group("crossprocess")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "backend.quotas", *args], cwd=ROOT, env=python_env(),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_parallel_starts_never_pass_the_limit_together(api: str, owner: dict[str, str]) -> None:
    ws = owner["X-Workspace-ID"]
    done = _cli("set", ws, "runs_per_day=4", "concurrent_runs=null")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[0]) == {"runs_per_day": 4, "concurrent_runs": None}
    refused = _cli("set", ws, "runs_per_week=3")
    assert refused.returncode == 2 and "runs_per_week" in refused.stderr
    r = httpx.post(
        f"{api}/api/v1/workflows", headers=owner, timeout=10,
        json={"name": f"q {uuid.uuid4().hex[:6]}",
              "nodes": [{"id": "start", "type": "trigger", "config": {"kind": "manual"}}],
              "connections": []},
    )  # fmt: skip
    assert r.status_code == 201, r.text
    body = {"workflow_id": r.json()["id"]}

    def start(_: int) -> int:
        return httpx.post(
            f"{api}/api/v1/executions", headers=owner, json=body, timeout=30
        ).status_code

    with ThreadPoolExecutor(12) as pool:
        codes = sorted(pool.map(start, range(12)))
    assert codes == [202] * 4 + [402] * 8
    usage = httpx.get(f"{api}/api/v1/workspaces/{ws}/usage", headers=owner, timeout=10).json()
    (per_day,) = [q for q in usage["quotas"] if q["quota"] == "runs_per_day"]
    assert (per_day["used"], per_day["limit"], per_day["exceeded"]) == (4, 4, True)
    shown = _cli("show", ws)
    assert shown.returncode == 0 and '"runs_per_day"' in shown.stdout
    assert _cli("clear", ws).returncode == 0
