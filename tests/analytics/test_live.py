"""WS /api/v1/ws/analytics through a real uvicorn and worker: the first
`analytics.counters` event holds runs by status and `hour`, the current hour's figures;
a run that completes moves both."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import websockets

from tests.support.crossprocess import wait_until_done

pytestmark = [pytest.mark.xdist_group("crossprocess-b"), pytest.mark.usefixtures("worker_name")]


async def test_the_analytics_socket_streams_the_current_hour(
    api: str,
    owner: dict[str, str],
) -> None:
    token = owner["Authorization"].removeprefix("Bearer ")
    url = api.replace("http://", "ws://") + "/api/v1/ws/analytics"
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"token": token, "workspace_id": owner["X-Workspace-ID"]}))

        async def counters(pred: Any = lambda _: True) -> dict[str, Any]:
            while True:
                body = json.loads(await asyncio.wait_for(ws.recv(), 30))
                event = body.get("event") or {}
                if event.get("type") == "analytics.counters" and pred(event["data"]):
                    return dict(event["data"])

        first = await counters()
        hour = first["hour"]
        now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        assert now - timedelta(hours=1) <= datetime.fromisoformat(hour["period"]) <= now
        assert set(hour["by_status"]) == {"pending", "running", "completed", "failed", "cancelled"}
        assert hour["runs"] == sum(hour["by_status"].values())
        assert {"p50", "p95", "p99", "mean"} <= set(hour["duration_ms"])
        before_runs, before_done = hour["runs"], first["completed"]

        definition = {
            "name": "live analytics",
            "nodes": [
                {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
                {"id": "two", "type": "logic", "config": {"kind": "transform", "template": "2"}},
            ],
            "connections": [{"source": "start", "target": "two"}],
        }
        r = await asyncio.to_thread(
            httpx.post, f"{api}/api/v1/workflows", headers=owner, json=definition, timeout=30
        )
        assert r.status_code == 201, r.text
        r = await asyncio.to_thread(
            httpx.post, f"{api}/api/v1/executions", headers=owner,
            json={"workflow_id": r.json()["id"]}, timeout=30,
        )  # fmt: skip
        assert r.status_code == 202, r.text
        await asyncio.to_thread(wait_until_done, api, owner, r.json()["id"], 60)
        after = await counters(lambda d: d["completed"] > before_done)
        assert after["completed"] == before_done + 1
        assert after["hour"]["runs"] == before_runs + 1
        assert after["hour"]["by_status"]["completed"] >= 1
        assert after["hour"]["duration_ms"]["mean"] is not None
