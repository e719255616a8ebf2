"""POST /executions/batch through a real uvicorn and a real worker: every run of the
batch completes (its runs travel ten to a `workflow.execute_many` message), ids come back
in the items' order, and a retried batch with the same Idempotency-Key starts nothing."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.xdist_group("crossprocess"), pytest.mark.usefixtures("worker_name")]


def _chain() -> dict[str, Any]:
    return {
        "nodes": [
            {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
            {"id": "double", "type": "logic",
             "config": {"kind": "transform", "template": "{{ trigger.x * 2 }}"}},
        ],
        "connections": [{"source": "start", "target": "double"}],
    }  # fmt: skip


def test_a_batch_of_runs_completes_in_order_and_a_retried_batch_starts_nothing(
    api: str, owner: dict[str, str]
) -> None:
    r = httpx.post(
        f"{api}/api/v1/workflows",
        headers=owner,
        json={"name": f"batch {uuid.uuid4().hex[:6]}", **_chain()},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    body = {"workflow_id": r.json()["id"], "items": [{"trigger_data": {"x": i}} for i in range(23)]}
    headers = {**owner, "Idempotency-Key": f"batch-{uuid.uuid4().hex[:8]}"}
    first = httpx.post(f"{api}/api/v1/executions/batch", headers=headers, json=body, timeout=30)
    assert first.status_code == 202, first.text
    ids = first.json()["ids"]
    assert len(ids) == 23 and len(set(ids)) == 23
    again = httpx.post(f"{api}/api/v1/executions/batch", headers=headers, json=body, timeout=30)
    assert again.status_code == 202 and again.json()["ids"] == ids
    # The key with other items (one changed) is the client's mistake: 409, starts nothing.
    changed = {**body, "items": [*body["items"][:-1], {"trigger_data": {"x": 99}}]}
    r = httpx.post(f"{api}/api/v1/executions/batch", headers=headers, json=changed, timeout=30)
    assert (r.status_code, r.json()["field"]) == (409, "Idempotency-Key"), r.text
    # ...and with more items (the extra ones would start) or fewer.
    for items in ([*body["items"], {"trigger_data": {"x": 23}}], body["items"][:-1]):
        r = httpx.post(
            f"{api}/api/v1/executions/batch", headers=headers, json={**body, "items": items},
            timeout=30,
        )  # fmt: skip
        assert (r.status_code, r.json()["field"]) == (409, "Idempotency-Key"), r.text
    deadline = time.monotonic() + 60
    outputs: dict[str, Any] = {}
    while len(outputs) < len(ids) and time.monotonic() < deadline:
        for run_id in ids:
            if run_id in outputs:
                continue
            run = httpx.get(f"{api}/api/v1/executions/{run_id}", headers=owner, timeout=10).json()
            if run["status"] in ("completed", "failed", "cancelled"):
                assert run["status"] == "completed", run
                outputs[run_id] = run["output"]
        time.sleep(0.1)
    assert [outputs.get(i) for i in ids] == [{"double": 2 * n} for n in range(23)]
    listed = httpx.get(
        f"{api}/api/v1/executions", headers=owner, params={"workflow_id": body["workflow_id"]},
        timeout=10,
    ).json()  # fmt: skip
    assert listed["total"] == 23
    # The same key for another batch (another workflow, other items) is a conflict, and
    # a single start with the key finds none of the batch's runs.
    other = httpx.post(
        f"{api}/api/v1/workflows", headers=owner, json={"name": "other", **_chain()}, timeout=10
    ).json()["id"]
    reused = {"workflow_id": other, "items": body["items"]}
    r = httpx.post(f"{api}/api/v1/executions/batch", headers=headers, json=reused, timeout=30)
    assert (r.status_code, r.json()["error"]) == (409, "conflict")
    one_key = {**owner, "Idempotency-Key": headers["Idempotency-Key"] + "#0"}
    single = httpx.post(
        f"{api}/api/v1/executions", headers=one_key, json={"workflow_id": body["workflow_id"]},
        timeout=10,
    )  # fmt: skip
    assert single.status_code == 202 and single.json()["id"] not in ids
    long_key = {**owner, "Idempotency-Key": "k" * 190}
    r = httpx.post(f"{api}/api/v1/executions/batch", headers=long_key, json=body, timeout=30)
    assert (r.status_code, r.json()["error"]) == (422, "validation_error")
    too_many = {**body, "items": [{"trigger_data": {}}] * 501}
    r = httpx.post(f"{api}/api/v1/executions/batch", headers=owner, json=too_many, timeout=30)
    assert (r.status_code, r.json()["error"]) == (422, "validation_error")
