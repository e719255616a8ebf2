"""/api/v1/analytics (analytics.read): overview, one workflow, performance, usage and
costs over `since`..`until` by `granularity`; and WS /api/v1/ws/analytics, the
`analytics` channel on a socket of its own."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, WebSocket

from backend.analytics import service
from backend.analytics.schemas import (
    Costs,
    Granularity,
    Overview,
    Performance,
    Usage,
    WorkflowAnalytics,
)
from backend.auth.dependencies import SettingsDep, WorkspaceAccess, require
from backend.auth.permissions import Permission
from backend.kit.db import SessionDep
from backend.models import Workflow
from backend.realtime.router import serve_channels

router = APIRouter(prefix="/analytics", tags=["analytics"])
sockets = APIRouter(tags=["analytics"])
READ = Permission.ANALYTICS_READ


def _window(
    settings: SettingsDep,
    since: Annotated[
        datetime | None,
        Query(
            description="Start (ISO 8601; no zone: UTC), rounded down to the hour. "
            "Default: 30 days before `until`"
        ),
    ] = None,
    until: Annotated[
        datetime | None,
        Query(description="End (exclusive), rounded up to the hour. Default: now"),
    ] = None,
    granularity: Annotated[Granularity, Query(description="Series points")] = "day",
) -> service.Window:
    return service.window(settings, since, until, granularity)


WindowDep = Annotated[service.Window, Depends(_window)]


async def _answer(
    request: Request, access: WorkspaceAccess, name: str, w: service.Window, answer: Any
) -> Response:
    # The JSON is written once (and cached as bytes); the routes' response models
    # document it in /openapi.json, and the tests check answers against them.
    parts = (str(access.workspace.id), name, w.key())
    body = await service.cached(request.app.state.redis, request.app.state.settings, parts, answer)
    return Response(content=body, media_type="application/json")


@router.get("/overview", response_model=Overview)
async def overview(
    request: Request,
    session: SessionDep,
    w: WindowDep,
    access: WorkspaceAccess = require(READ, scope="header"),
) -> Response:
    """Runs by status, success rate, duration and queue-wait percentiles, retries,
    tokens and cost, as totals and a series; the top failing nodes; spend by model."""
    ws = access.workspace.id
    return await _answer(request, access, "overview", w, lambda: service.overview(session, ws, w))


@router.get("/workflows/{workflow_id}", response_model=WorkflowAnalytics)
async def workflow(
    request: Request,
    session: SessionDep,
    w: WindowDep,
    access: WorkspaceAccess = require(READ, resource=Workflow, param="workflow_id"),
) -> Response:
    """One workflow: its totals, series and failing nodes with their error classes."""
    ws, wf = access.workspace.id, access.resource.id
    return await _answer(
        request, access, f"workflow:{wf}", w, lambda: service.workflow(session, ws, wf, w)
    )


@router.get("/performance", response_model=Performance)
async def performance(
    request: Request,
    session: SessionDep,
    w: WindowDep,
    access: WorkspaceAccess = require(READ, scope="header"),
) -> Response:
    """Duration p50/p95/p99 and queue wait per workflow and per node type."""
    ws = access.workspace.id
    return await _answer(
        request, access, "performance", w, lambda: service.performance(session, ws, w)
    )


@router.get("/usage", response_model=Usage)
async def usage(
    request: Request,
    session: SessionDep,
    w: WindowDep,
    access: WorkspaceAccess = require(READ, scope="header"),
) -> Response:
    """Runs and tokens (input, output, cache) per period, workflow, model and agent."""
    ws = access.workspace.id
    return await _answer(request, access, "usage", w, lambda: service.usage(session, ws, w))


@router.get("/costs", response_model=Costs)
async def costs(
    request: Request,
    session: SessionDep,
    w: WindowDep,
    access: WorkspaceAccess = require(READ, scope="header"),
) -> Response:
    """Cost and tokens by model, agent, workflow and period, costliest first."""
    ws = access.workspace.id
    return await _answer(request, access, "costs", w, lambda: service.costs(session, ws, w))


@sockets.websocket("/ws/analytics")
async def analytics_socket(websocket: WebSocket) -> None:
    """The `analytics` channel of `WS /api/v1/ws`, subscribed at once: the same hello
    (`{"token": ..., "workspace_id": ...}` or the bearer subprotocol) and close codes."""
    await serve_channels(websocket, subscribe=("analytics",))
