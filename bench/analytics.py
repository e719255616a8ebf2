"""Analytics benchmark (issue 14): a workspace with 100k runs over 30 days (10
workflows, 3 node rows each, inserted in bulk with SQL), one aggregation pass, then
every analytics endpoint timed in process with the Redis cache off (cold: the work
itself) and on (warm). Goal: every endpoint < 200 ms.

    BENCH_PARTS=analytics make bench     (wired in bench/__main__.py)
    scripts/devstack.py exec --ephemeral -- python -m bench.analytics   (on its own)
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
RUNS = int(os.environ.get("BENCH_ANALYTICS_RUNS", "100000"))
REPEAT = int(os.environ.get("BENCH_ANALYTICS_REPEAT", "15"))
GOAL_MS = 200.0

SEED = """
WITH flows AS (
  SELECT id, row_number() OVER (ORDER BY id) - 1 AS i FROM workflows WHERE workspace_id = %(ws)s
), runs AS (
  INSERT INTO workflow_executions (id, workspace_id, workflow_id, version, status, trigger_type,
      created_at, started_at, finished_at, duration_ms, input_tokens, output_tokens, cost_usd)
  SELECT gen_random_uuid(), %(ws)s, f.id, 1,
         (ARRAY['completed','completed','completed','failed','cancelled'])[1 + g %% 5],
         'manual', t, t + interval '150 ms', t + interval '150 ms' + (g %% 900) * interval '1 ms',
         g %% 900, 200, 80, 0.002
  FROM generate_series(0, %(n)s - 1) g
  JOIN flows f ON f.i = g %% 10
  CROSS JOIN LATERAL (SELECT %(start)s::timestamptz + (g * %(step)s) * interval '1 second' AS t) s
  RETURNING id, status
)
INSERT INTO node_executions (id, execution_id, node_id, iteration, status, attempt, duration_ms,
    input_tokens, output_tokens, cost_usd, output, error)
SELECT gen_random_uuid(), r.id, n.node_id, 0,
       CASE WHEN n.node_id = 'fetch' AND r.status = 'failed' THEN 'failed' ELSE 'completed' END,
       CASE WHEN n.node_id = 'think' THEN 2 ELSE 1 END, 10,
       CASE WHEN n.node_id = 'think' THEN 200 ELSE 0 END,
       CASE WHEN n.node_id = 'think' THEN 80 ELSE 0 END,
       CASE WHEN n.node_id = 'think' THEN 0.002 ELSE 0 END,
       CASE WHEN n.node_id = 'think' THEN '{"model": "claude-sonnet-5-5"}'::jsonb END,
       CASE WHEN n.node_id = 'fetch' AND r.status = 'failed'
            THEN '{"class": "transient", "message": "503"}'::jsonb END
FROM runs r CROSS JOIN (VALUES ('start'), ('think'), ('fetch')) n(node_id)
"""


def _prepare() -> str:
    """A fresh database of its own, migrated; returns its URL (DATABASE_URL is set)."""
    admin = make_url(os.environ["DATABASE_URL"]).set(drivername="postgresql")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS orch_bench_analytics WITH (FORCE)")
        conn.execute("CREATE DATABASE orch_bench_analytics")
    url = admin.set(database="orch_bench_analytics").render_as_string(hide_password=False)
    os.environ.update(DATABASE_URL=url, ENVIRONMENT="test", LOG__LEVEL="WARNING")
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, env=dict(os.environ),
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return url


def measure(url: str | None = None) -> dict[str, Any]:
    url = url or _prepare()
    from bench.engine import owner_headers

    headers = owner_headers(url)
    ws = uuid.UUID(headers["X-Workspace-ID"])
    agent_id = uuid.uuid4()
    now = datetime.now(UTC)
    start = now - timedelta(days=30)
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO agents (id, workspace_id, name, model, max_tokens) "
            "VALUES (%s, %s, 'Writer', 'claude-sonnet-5-5', 256)", (agent_id, ws),
        )  # fmt: skip
        definition = json.dumps(
            {
                "nodes": [
                    {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
                    {"id": "think", "type": "agent",
                     "config": {"agent_id": str(agent_id), "prompt": "hi"}},
                    {"id": "fetch", "type": "action",
                     "config": {"kind": "http_request", "url": "https://example.com"}},
                ],
                "connections": [],
                "settings": {},
            }
        )  # fmt: skip
        for i in range(10):
            wf = uuid.uuid4()
            conn.execute(
                "INSERT INTO workflows (id, workspace_id, name, status, tags, current_version) "
                "VALUES (%s, %s, %s, 'active', '{}', 1)", (wf, ws, f"Flow {i}"),
            )  # fmt: skip
            conn.execute(
                "INSERT INTO workflow_versions (id, workflow_id, number, definition) "
                "VALUES (%s, %s, 1, %s)", (uuid.uuid4(), wf, definition),
            )  # fmt: skip
        t0 = time.perf_counter()
        step = (30 * 86400) / RUNS
        conn.execute(SEED, {"ws": ws, "n": RUNS, "start": start, "step": step})
        conn.commit()
        conn.execute("ANALYZE workflow_executions")
        conn.execute("ANALYZE node_executions")
        seeded_s = time.perf_counter() - t0
    return asyncio.run(_time(headers, seeded_s))


async def _time(headers: dict[str, str], seeded_s: float) -> dict[str, Any]:
    from backend.analytics.aggregate import aggregate_pass
    from backend.config import get_settings
    from backend.main import create_app

    settings = get_settings()
    app = create_app(settings)
    figures: dict[str, Any] = {"runs": RUNS, "seed_s": round(seeded_s, 1)}
    async with app.router.lifespan_context(app):
        t0 = time.perf_counter()
        done = await aggregate_pass(app.state.sessionmaker)
        figures["aggregate_first_pass_s"] = round(time.perf_counter() - t0, 2)
        figures["aggregate_rows"] = done["rows"]
        t0 = time.perf_counter()
        await aggregate_pass(app.state.sessionmaker)
        figures["aggregate_idle_pass_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        workflow = await _first_workflow(app, headers)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            paths = ["overview", "performance", "usage", "costs", f"workflows/{workflow}"]
            windows = {"30d/day": {"granularity": "day"}, "30d/hour": {"granularity": "hour"}}
            for cache_ttl in (0.0, 10.0):
                app.state.settings = settings.model_copy(
                    update={
                        "analytics": settings.analytics.model_copy(
                            update={"cache_ttl_s": cache_ttl}
                        )
                    }
                )
                label = "cold" if cache_ttl == 0 else "warm"
                for path in paths:
                    for wname, params in windows.items():
                        times = []
                        for _ in range(REPEAT):
                            t0 = time.perf_counter()
                            r = await client.get(
                                f"/api/v1/analytics/{path}", headers=headers, params=params
                            )
                            times.append((time.perf_counter() - t0) * 1000)
                            assert r.status_code == 200, r.text
                        name = path.split("/")[0]
                        figures[f"{label} {name} {wname}"] = (
                            round(statistics.median(times), 1),
                            round(sorted(times)[int(0.95 * (len(times) - 1))], 1),
                        )
    return figures


async def _first_workflow(app: Any, headers: dict[str, str]) -> str:
    from sqlalchemy import text

    async with app.state.sessionmaker() as session:
        found = await session.scalar(
            text("SELECT id FROM workflows WHERE workspace_id = :ws ORDER BY name LIMIT 1"),
            {"ws": headers["X-Workspace-ID"]},
        )
    return str(found)


def report(figures: dict[str, Any]) -> None:
    print(f"\nAnalytics: {figures['runs']} runs over 30 days, 10 workflows, 3 nodes each")
    print(f"  seeded in {figures['seed_s']} s; first aggregation pass "
          f"{figures['aggregate_first_pass_s']} s ({figures['aggregate_rows']} rows), "
          f"an idle pass {figures['aggregate_idle_pass_ms']} ms")  # fmt: skip
    print(f"  {'endpoint (median / p95 ms)':<36} goal < {GOAL_MS:.0f} ms")
    worst = 0.0
    for name, value in figures.items():
        if isinstance(value, tuple):
            worst = max(worst, value[1])
            flag = "ok" if value[1] < GOAL_MS else "SLOW"
            print(f"  {name:<36} {value[0]:>7.1f} / {value[1]:>7.1f}  {flag}")
    print(f"  worst p95: {worst:.1f} ms")


if __name__ == "__main__":
    report(measure())
