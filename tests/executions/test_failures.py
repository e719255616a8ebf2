"""Loops, retries and failures through a real uvicorn and worker, counting side effects
on a local HTTP target: for_each over 20 items calls each item once, a flaky call is
retried until it succeeds, a permanent error fails the run at once, and `retry` re-runs
only what failed."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.crossprocess import wait_until_done, workflow
from tests.support.target import Target, http_target

pytestmark = [pytest.mark.xdist_group("crossprocess"), pytest.mark.usefixtures("worker_name")]


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    with http_target() as t:
        yield t


def call(node_id: str, url: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": node_id,
        "type": "action",
        "config": {"kind": "http_request", "url": url},
        **extra,
    }


def linear(*nodes: dict[str, Any]) -> dict[str, Any]:
    everything = [{"id": "start", "type": "trigger", "config": {"kind": "manual"}}, *nodes]
    ids = [n["id"] for n in everything]
    return {
        "nodes": everything,
        "connections": [{"source": a, "target": b} for a, b in itertools.pairwise(ids)],
    }


def run(api: str, owner: dict[str, str], workflow_id: str) -> dict[str, Any]:
    r = httpx.post(
        f"{api}/api/v1/executions", headers=owner, json={"workflow_id": workflow_id}, timeout=10
    )
    assert r.status_code == 202, r.text
    return wait_until_done(api, owner, r.json()["id"], timeout_s=60)


def nodes_of(api: str, owner: dict[str, str], execution_id: str) -> dict[str, Any]:
    rows = httpx.get(f"{api}/api/v1/executions/{execution_id}/nodes", headers=owner, timeout=10)
    return {n["node_id"]: n for n in rows.json() if n["iteration"] == 0}


def test_for_each_over_20_items_and_a_flaky_call_retried_until_it_succeeds(
    api: str, owner: dict[str, str], target: Target
) -> None:
    key = uuid.uuid4().hex[:8]
    body = {"nodes": [call("get", f"{target.base}/ok?n={key}-{{{{ item }}}}")]}
    loop = {
        "id": "loop",
        "type": "logic",
        "config": {
            "kind": "for_each",
            "items": "range(20) | list",
            "body": body,
            "max_concurrency": 5,
        },
    }
    flaky = call(
        "flaky", f"{target.base}/flaky/{key}/2", retry={"max_retries": 3, "backoff_s": [0.1, 0.2]}
    )
    done = run(api, owner, workflow(api, owner, linear(loop, flaky)))
    assert done["status"] == "completed", done["error"]
    nodes = nodes_of(api, owner, done["id"])
    assert [item["status"] for item in nodes["loop"]["output"]] == [200] * 20
    # Every item called exactly once.
    assert [target.query_hits[f"{key}-{i}"] for i in range(20)] == [1] * 20
    # Two 503s, then the third attempt succeeded.
    assert target.hits[f"flaky/{key}/2"] == 3
    assert (nodes["flaky"]["attempt"], nodes["flaky"]["output"]["status"]) == (3, 200)


def test_a_permanent_error_fails_the_run_and_retry_reruns_only_what_failed(
    api: str, owner: dict[str, str], target: Target
) -> None:
    key = uuid.uuid4().hex[:8]
    # A 404 is permanent: one attempt, however many retries the policy allows.
    gone = run(api, owner, workflow(api, owner, linear(call("gone", f"{target.base}/status/404"))))
    assert gone["status"] == "failed"
    assert gone["error"]["node_id"] == "gone"
    assert gone["error"]["class"] == "permanent"
    assert nodes_of(api, owner, gone["id"])["gone"]["attempt"] == 1

    # b fails once (no retries allowed), so the run fails after a succeeded; a retry of
    # the run reuses a's result and runs b (now healthy) and c.
    no_retry = {"retry": {"max_retries": 0}}
    definition = linear(
        call("a", f"{target.base}/ok?n={key}-a"),
        call("b", f"{target.base}/flaky/{key}/1", **no_retry),
        call("c", f"{target.base}/ok?n={key}-c"),
    )
    first = run(api, owner, workflow(api, owner, definition))
    assert first["status"] == "failed"
    assert first["error"]["node_id"] == "b"
    assert (target.query_hits[f"{key}-a"], target.query_hits[f"{key}-c"]) == (1, 0)
    r = httpx.post(f"{api}/api/v1/executions/{first['id']}/retry", headers=owner, timeout=10)
    assert r.status_code == 202, r.text
    second = wait_until_done(api, owner, r.json()["id"], timeout_s=60)
    assert second["status"] == "completed", second["error"]
    assert second["retry_of"] == first["id"]
    # a did not run again; b ran a second time; c ran once.
    assert target.query_hits[f"{key}-a"] == 1
    assert target.hits[f"flaky/{key}/1"] == 2
    assert target.query_hits[f"{key}-c"] == 1
    assert nodes_of(api, owner, second["id"])["a"]["output"]["status"] == 200
