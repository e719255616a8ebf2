"""Executions through the public API of a real uvicorn, run by a real Celery worker."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from tests.support.crossprocess import wait_until_done, workflow
from tests.support.definitions import chain
from tests.support.procs import wait_for
from tests.support.target import http_target

pytestmark = [pytest.mark.xdist_group("crossprocess"), pytest.mark.usefixtures("worker_name")]


def test_a_run_goes_from_post_to_completed_through_the_worker(
    api: str, owner: dict[str, str]
) -> None:
    wf = workflow(api, owner, chain(5))
    r = httpx.post(
        f"{api}/api/v1/executions",
        headers={**owner, "Idempotency-Key": "e2e-1"},
        json={"workflow_id": wf, "trigger_data": {"x": 10}},
        timeout=10,
    )
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["status"] == "pending"
    assert r.headers["location"] == accepted["links"]["self"]
    # The same key gives back the same execution.
    again = httpx.post(
        f"{api}/api/v1/executions",
        headers={**owner, "Idempotency-Key": "e2e-1"},
        json={"workflow_id": wf, "trigger_data": {"x": 10}},
        timeout=10,
    )
    assert (again.status_code, again.json()["id"]) == (200, accepted["id"])
    # The key with another body is a client's mistake: 409, not the first run's answer.
    other = httpx.post(
        f"{api}/api/v1/executions",
        headers={**owner, "Idempotency-Key": "e2e-1"},
        json={"workflow_id": wf, "trigger_data": {"x": 11}},
        timeout=10,
    )
    assert (other.status_code, other.json()["field"]) == (409, "Idempotency-Key"), other.text
    # The same body is the same, whatever jsonb makes of its numbers (1e23 comes back
    # from the row as a 24-digit integer) and its keys' order.
    key = {**owner, "Idempotency-Key": f"e2e-{uuid.uuid4().hex[:8]}"}
    data = {"x": 1e23, "y": 1.2345678901234567e19, "z": [1, 2.5, {"b": 2, "a": 1}]}
    body = {"workflow_id": workflow(api, owner, chain(2)), "trigger_data": data}
    first = httpx.post(f"{api}/api/v1/executions", headers=key, json=body, timeout=10)
    assert first.status_code == 202, first.text
    again = httpx.post(f"{api}/api/v1/executions", headers=key, json=body, timeout=10)
    assert (again.status_code, again.json()["id"]) == (200, first.json()["id"]), again.text
    done = wait_until_done(api, owner, accepted["id"])
    assert done["status"] == "completed", done
    assert done["output"] == {"n4": 15}
    assert [n["status"] for n in done["nodes"]] == ["completed"] * 6
    nodes = httpx.get(
        f"{api}/api/v1/executions/{accepted['id']}/nodes", headers=owner, timeout=10
    ).json()
    assert {n["node_id"]: n["output"] for n in nodes}["n2"] == 13
    logs = httpx.get(
        f"{api}/api/v1/executions/{accepted['id']}/logs", headers=owner, timeout=10
    ).json()
    assert logs[-1]["message"] == "completed"
    listed = httpx.get(
        f"{api}/api/v1/executions", headers=owner, params={"workflow_id": wf}, timeout=10
    ).json()
    assert listed["total"] == 1


def test_cancel_through_the_api_stops_a_running_execution(api: str, owner: dict[str, str]) -> None:
    with http_target() as target:
        slow = {
            "nodes": [
                {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
                {
                    "id": "wait",
                    "type": "action",
                    "config": {"kind": "http_request", "url": f"{target.base}/slow/20"},
                },
            ],
            "connections": [{"source": "start", "target": "wait"}],
        }
        wf = workflow(api, owner, slow)
        started = httpx.post(
            f"{api}/api/v1/executions", headers=owner, json={"workflow_id": wf}, timeout=10
        ).json()
        wait_for(lambda: target.hits["slow/20"] == 1, timeout_s=20, what="the slow call to start")
        asked = time.monotonic()
        r = httpx.post(f"{api}/api/v1/executions/{started['id']}/cancel", headers=owner, timeout=10)
        assert r.status_code == 202
        done = wait_until_done(api, owner, started["id"], timeout_s=10)
        assert done["status"] == "cancelled"
        assert time.monotonic() - asked < 2.0
        # A finished run cannot be cancelled again.
        r = httpx.post(f"{api}/api/v1/executions/{started['id']}/cancel", headers=owner, timeout=10)
        assert (r.status_code, r.json()["error"]) == (409, "invalid_transition")


def test_retry_and_rerun(api: str, owner: dict[str, str]) -> None:
    bad = chain(2)
    bad["nodes"][2]["config"]["template"] = "{{ nodes.n0.output.missing.deeper }}"
    wf = workflow(api, owner, bad)
    first = httpx.post(
        f"{api}/api/v1/executions",
        headers=owner,
        json={"workflow_id": wf, "trigger_data": {"x": 1}},
        timeout=10,
    ).json()
    failed = wait_until_done(api, owner, first["id"])
    assert failed["status"] == "failed"
    assert failed["error"]["node_id"] == "n1"
    retried = httpx.post(f"{api}/api/v1/executions/{first['id']}/retry", headers=owner, timeout=10)
    assert retried.status_code == 202
    again = wait_until_done(api, owner, retried.json()["id"])
    assert again["status"] == "failed"
    assert again["retry_of"] == first["id"]
    rerun = httpx.post(f"{api}/api/v1/executions/{first['id']}/rerun", headers=owner, timeout=10)
    assert rerun.status_code == 202
    assert wait_until_done(api, owner, rerun.json()["id"])["status"] == "failed"
