"""GET /metrics on the API: refused without the token, and the request counters move."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI, WebSocket
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.testclient import TestClient

from backend.config import Settings
from backend.main import create_app
from backend.observability import metrics
from backend.observability.api import MetricsMiddleware
from tests.support.asgi import client_for
from tests.support.identity import Actor


def value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _client(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], token: str | None
) -> AsyncIterator[httpx.AsyncClient]:
    metrics = settings.metrics.model_copy(
        update={"token": SecretStr(token) if token is not None else None}
    )
    app = create_app(settings.model_copy(update={"metrics": metrics}))
    async for c in client_for(app, sessionmaker):
        yield c


async def test_metrics_needs_the_token_and_counts_requests_by_route_template(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], editor: Actor
) -> None:
    token = "metrics-token-for-tests-0123456789"
    async for client in _client(settings, sessionmaker, token):
        assert (await client.get("/metrics")).status_code == 404
        wrong = await client.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 404
        auth = {"Authorization": f"Bearer {token}"}
        before = (await client.get("/metrics", headers=auth)).text
        route = "/api/v1/workflows/{workflow_id}"
        for _ in range(3):
            missing = await client.get(
                "/api/v1/workflows/00000000-0000-0000-0000-000000000000", headers=editor.headers
            )
            assert missing.status_code == 404
        after = await client.get("/metrics", headers=auth)
        assert after.status_code == 200
        assert after.headers["content-type"].startswith("text/plain")
        text = after.text
        labels = {"route": route, "method": "GET", "status": "404"}
        grown = value(text, "orch_http_requests_total", **labels) - value(
            before, "orch_http_requests_total", **labels
        )
        assert grown == 3
        assert value(text, "orch_http_request_duration_seconds_count", route=route) >= 3
        # Raw paths never become labels.
        assert "00000000-0000-0000-0000-000000000000" not in text
        assert re.search(r"orch_db_pool_in_use\{pid=\"\d+\"\} \d", text)


async def test_without_a_token_metrics_is_not_served_on_the_public_port(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    for token in (None, ""):
        async for client in _client(settings, sessionmaker, token):
            for header in ("Bearer ", "Bearer", ""):
                response = await client.get("/metrics", headers={"Authorization": header})
                assert response.status_code == 404


def test_open_websockets_are_counted_by_route_without_touching_their_frames() -> None:
    app = FastAPI()
    app.add_middleware(MetricsMiddleware)
    route = "/things/{thing_id}/live"

    @app.websocket(route)
    async def live(websocket: WebSocket, thing_id: str) -> None:
        await websocket.accept()
        for i in range(3):
            await websocket.send_text(f"{thing_id}:{i}")
        await websocket.receive_text()

    gauge = metrics.WEBSOCKETS.labels(route=route)
    before = gauge._value.get()
    with TestClient(app) as client, client.websocket_connect("/things/7/live") as ws:
        assert [ws.receive_text() for _ in range(3)] == ["7:0", "7:1", "7:2"]
        assert gauge._value.get() == before + 1
        ws.send_text("bye")
    assert gauge._value.get() == before
