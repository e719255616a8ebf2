"""The analytics API over a seeded month of real rows: totals, series, percentiles,
breakdowns and failing nodes; aggregates and the live tail agree; bad input is refused."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import BaseModel
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.analytics.aggregate import aggregate_pass
from backend.analytics.schemas import Costs, Overview, Performance, Usage, WorkflowAnalytics
from backend.auth.permissions import Role
from backend.config import Settings
from backend.models import AnalyticsAggregate, Workspace
from tests.analytics.seed import Seeded, add_run
from tests.support.factories import create_workflow
from tests.support.identity import Actor, make_workspace, member

ENDPOINTS = ("overview", "performance", "usage", "costs")


def _window(s: Seeded, granularity: str = "day") -> dict[str, str]:
    return {
        "since": s.start.isoformat(),
        "until": (s.start + timedelta(days=31)).isoformat(),
        "granularity": granularity,
    }


async def _get(client: httpx.AsyncClient, actor: Actor, path: str, **params: str) -> Any:
    response = await client.get(f"/api/v1/analytics/{path}", headers=actor.headers, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def _close(value: float | None, expected: float) -> bool:
    # Histogram percentiles are within +-12 % of the exact value.
    return value is not None and abs(value - expected) <= 0.12 * expected


async def test_overview_answers_what_the_seeded_month_holds(
    client: httpx.AsyncClient,
    sessionmaker: async_sessionmaker[AsyncSession],
    month: Seeded,
    viewer: Actor,
) -> None:
    await aggregate_pass(sessionmaker)
    body = await _get(client, viewer, "overview", **_window(month))
    totals = body["totals"]
    assert totals["runs"] == 120
    assert totals["by_status"] == {
        "pending": 0, "running": 0, "completed": 60, "failed": 30, "cancelled": 30,
    }  # fmt: skip
    assert totals["success_rate"] == 0.5
    assert totals["duration_ms"]["mean"] == 250.0
    assert _close(totals["duration_ms"]["p50"], 200.0)
    assert _close(totals["duration_ms"]["p99"], 400.0)
    assert _close(totals["queue_wait_ms"]["p95"], 200.0)
    assert totals["retries"] == 120  # every run's agent node took a second attempt
    assert totals["tokens"] == {
        "input": 12000,
        "output": 6000,
        "cache_read": 840,
        "cache_write": 360,
    }
    assert totals["cost_usd"] == pytest.approx(1.2)
    assert len(body["series"]) == 30
    assert all(point["runs"] == 4 for point in body["series"])
    top = body["top_failing_nodes"][0]
    assert top == {
        "workflow_id": str(month.workflow.id),
        "node_id": "fetch",
        "failures": 30,
        "error_classes": {"transient": 30},
    }
    (model,) = body["by_model"]
    assert model["key"] == "claude-sonnet-5-5" and model["runs"] == 120
    assert model["cost_usd"] == pytest.approx(1.2)


async def test_every_endpoint_answers_the_same_from_aggregates_and_from_the_live_tail(
    client: httpx.AsyncClient,
    sessionmaker: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    month: Seeded,
    viewer: Actor,
    app: Any,
) -> None:
    # Nothing aggregated yet: every answer comes from the runs themselves.
    app.state.settings = app.state.settings.model_copy(
        update={"analytics": app.state.settings.analytics.model_copy(update={"cache_ttl_s": 0})}
    )
    paths = [*ENDPOINTS, f"workflows/{month.workflow.id}"]
    live = {p: await _get(client, viewer, p, **_window(month)) for p in paths}
    result = await aggregate_pass(sessionmaker)
    # At least this month's 30 hours: the pass aggregates every hour with runs in the
    # database, and tests that commit (engine tests, on the same xdist worker) add theirs.
    assert result["hours"] >= 30 and result["rows"] > 0
    stored = {p: await _get(client, viewer, p, **_window(month)) for p in paths}
    assert stored == live
    # The answers are written as JSON directly: each must be what its schema says,
    # also hourly (day rows and hour rows mixed) and by week and month.
    shapes: dict[str, type[BaseModel]] = {
        "overview": Overview, "performance": Performance, "usage": Usage,
        "costs": Costs, "workflows": WorkflowAnalytics,
    }  # fmt: skip
    for granularity in ("hour", "week", "month"):
        for p in paths:
            body = await _get(client, viewer, p, **_window(month, granularity))
            shapes[p.split("/")[0]].model_validate(body, strict=False)
            assert body["totals" if p != "costs" else "tokens"]
    rows = (await session.scalars(select(AnalyticsAggregate))).all()
    assert {r.kind for r in rows} >= {
        "workspace",
        "workflow",
        "node_type",
        "model",
        "agent",
        "failure",
    }


async def test_breakdowns_by_workflow_node_type_model_and_agent(
    client: httpx.AsyncClient,
    sessionmaker: async_sessionmaker[AsyncSession],
    month: Seeded,
    viewer: Actor,
) -> None:
    await aggregate_pass(sessionmaker)
    perf = await _get(client, viewer, "performance", **_window(month))
    flows = {item["key"]: item for item in perf["by_workflow"]}
    main, other = flows[str(month.workflow.id)], flows[str(month.other.id)]
    assert (main["name"], main["runs"], other["name"], other["runs"]) == ("Main", 90, "Other", 30)
    assert _close(other["duration_ms"]["p50"], 400.0)
    types = {item["key"]: item for item in perf["by_node_type"]}
    assert set(types) == {"trigger", "agent", "action"}
    assert types["action"]["by_status"]["failed"] == 30
    assert types["agent"]["retries"] == 120
    costs = await _get(client, viewer, "costs", **_window(month, "week"))
    assert costs["cost_usd"] == pytest.approx(1.2)
    (agent,) = costs["by_agent"]
    assert (agent["key"], agent["name"]) == (str(month.agent.id), "Writer")
    assert sum(p["cost_usd"] for p in costs["series"]) == pytest.approx(1.2)
    assert all(datetime.fromisoformat(p["period"]).weekday() == 0 for p in costs["series"])
    usage = await _get(client, viewer, "usage", **_window(month, "month"))
    assert sum(p["tokens"]["input"] for p in usage["series"]) == 12000
    flow = await _get(client, viewer, f"workflows/{month.other.id}", **_window(month))
    assert flow["totals"]["by_status"]["cancelled"] == 30
    assert flow["top_failing_nodes"] == []


async def test_aggregation_is_idempotent_and_folds_in_late_finishes(
    client: httpx.AsyncClient,
    sessionmaker: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    month: Seeded,
    viewer: Actor,
) -> None:
    def snapshot(rows: Any) -> set[tuple[Any, ...]]:
        return {
            (r.span, r.bucket, r.kind, r.key, r.runs, r.completed, r.failed, r.duration_count,
             r.cost_usd, tuple(sorted(r.duration_hist.items())))
            for r in rows
        }  # fmt: skip

    fresh = select(AnalyticsAggregate).execution_options(populate_existing=True)
    await aggregate_pass(sessionmaker)
    first = snapshot((await session.scalars(fresh)).all())
    # The same period again (cursor rewound): the same rows, none added.
    await session.execute(update(AnalyticsAggregate).values(runs=-1))
    from backend.models import AnalyticsCursor

    await session.execute(delete(AnalyticsCursor))
    await aggregate_pass(sessionmaker)
    assert snapshot((await session.scalars(fresh)).all()) == first
    # A run created 20 days ago that is only now finishing: its old hour is rebuilt.
    old = month.start + timedelta(days=10, hours=5)
    late = await add_run(session, month, month.workflow, old, "running", None)
    await aggregate_pass(sessionmaker)
    late.status, late.finished_at, late.duration_ms = "completed", datetime.now(UTC), 999.0
    await session.flush()
    await aggregate_pass(sessionmaker)
    row = await session.get(
        AnalyticsAggregate,
        (month.workspace.id, "hour", old.replace(minute=0), "workflow", str(month.workflow.id)),
        populate_existing=True,
    )
    assert row is not None and (row.runs, row.completed, row.running) == (1, 1, 0)
    # Its day row was rebuilt with it: the sum of that day's hour rows, histograms too.
    day_start = old.replace(hour=0, minute=0)
    hours = (
        await session.scalars(
            fresh.where(
                AnalyticsAggregate.span == "hour",
                AnalyticsAggregate.kind == "workflow",
                AnalyticsAggregate.key == str(month.workflow.id),
                AnalyticsAggregate.bucket >= day_start,
                AnalyticsAggregate.bucket < day_start + timedelta(days=1),
            )
        )
    ).all()
    day = await session.get(
        AnalyticsAggregate,
        (month.workspace.id, "day", day_start, "workflow", str(month.workflow.id)),
        populate_existing=True,
    )
    assert day is not None and len(hours) >= 2
    assert (day.runs, day.completed, day.running) == (
        sum(h.runs for h in hours),
        sum(h.completed for h in hours),
        0,
    )
    assert sum(day.duration_hist.values()) == sum(sum(h.duration_hist.values()) for h in hours)
    body = await _get(client, viewer, "overview", **_window(month, "hour"))
    assert body["totals"]["runs"] == 121
    assert body["totals"]["by_status"]["completed"] == 61


async def test_runs_since_the_last_pass_are_counted_live(
    client: httpx.AsyncClient,
    sessionmaker: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    month: Seeded,
    viewer: Actor,
) -> None:
    await aggregate_pass(sessionmaker)
    await add_run(session, month, month.other, datetime.now(UTC), "pending", None)
    now = datetime.now(UTC)
    body = await _get(
        client, viewer, "overview",
        since=(now - timedelta(hours=2)).isoformat(), until=(now + timedelta(hours=1)).isoformat(),
        granularity="hour",
    )  # fmt: skip
    assert body["totals"]["by_status"]["pending"] == 1


async def test_answers_are_cached_briefly(
    client: httpx.AsyncClient,
    session: AsyncSession,
    month: Seeded,
    viewer: Actor,
) -> None:
    first = await _get(client, viewer, "overview", **_window(month))
    await add_run(session, month, month.workflow, month.start + timedelta(hours=3), "failed", 5.0)
    assert await _get(client, viewer, "overview", **_window(month)) == first
    fresh = await _get(client, viewer, "overview", **_window(month, "week"))
    assert fresh["totals"]["runs"] == first["totals"]["runs"] + 1


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "since"),
        ({"since": "2020-01-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "since"),
        (
            {
                "since": "2025-01-01T00:00:00Z",
                "until": "2026-01-01T00:00:00Z",
                "granularity": "hour",
            },
            "granularity",
        ),
        ({"granularity": "year"}, "granularity"),
        ({"since": "yesterday"}, "since"),
    ],
)
async def test_bad_windows_are_refused_with_the_field(
    client: httpx.AsyncClient, viewer: Actor, params: dict[str, str], field: str
) -> None:
    for path in ENDPOINTS:
        response = await client.get(
            f"/api/v1/analytics/{path}", headers=viewer.headers, params=params
        )
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["error"] == "validation_error"
        assert field in (body.get("field") or body["fields"][0]["field"])


async def test_analytics_are_scoped_to_the_workspace(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    month: Seeded,
    viewer: Actor,
) -> None:
    stranger_ws = await make_workspace(session, "Elsewhere")
    stranger = await member(session, settings, stranger_ws, Role.OWNER)
    foreign = await create_workflow(session, stranger_ws.id)
    # Someone else's workflow is not found; someone else's workspace is refused.
    response = await client.get(f"/api/v1/analytics/workflows/{foreign.id}", headers=viewer.headers)
    assert response.status_code == 404
    response = await client.get(
        f"/api/v1/analytics/workflows/{month.workflow.id}", headers=stranger.headers
    )
    assert response.status_code == 404
    headers = {**stranger.headers, "X-Workspace-ID": str(month.workspace.id)}
    for path in ENDPOINTS:
        response = await client.get(f"/api/v1/analytics/{path}", headers=headers)
        assert response.status_code in (403, 404), response.text
    # Their own workspace has none of our runs.
    headers = {**stranger.headers, "X-Workspace-ID": str(stranger_ws.id)}
    response = await client.get("/api/v1/analytics/overview", headers=headers)
    assert response.json()["totals"]["runs"] == 0
    response = await client.get("/api/v1/analytics/overview")
    assert response.status_code == 401
    response = await client.get(
        f"/api/v1/analytics/workflows/{uuid.uuid4()}", headers=viewer.headers
    )
    assert response.status_code == 404


async def test_every_analytics_route_is_in_openapi(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    for path in ENDPOINTS:
        assert f"/api/v1/analytics/{path}" in paths
    assert "/api/v1/analytics/workflows/{workflow_id}" in paths


async def test_a_workspace_without_runs_answers_zeros(
    client: httpx.AsyncClient, team: Workspace, viewer: Actor
) -> None:
    body = await _get(client, viewer, "performance")
    assert body["totals"]["runs"] == 0 and body["totals"]["success_rate"] is None
    assert body["totals"]["duration_ms"] == {"mean": None, "p50": None, "p95": None, "p99": None}
    assert body["series"] == [] and body["by_workflow"] == []
