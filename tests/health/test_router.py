"""Liveness and readiness, including which dependency is down."""

from __future__ import annotations

import httpx
import pytest

from backend.config import Settings
from backend.kit.celery_app import create_celery_app
from backend.main import create_app
from tests.support.asgi import client_for
from tests.support.procs import free_port


async def test_liveness(client: httpx.AsyncClient) -> None:
    r = await client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


async def test_ready_when_every_dependency_answers(client: httpx.AsyncClient) -> None:
    r = await client.get("/health/ready")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"database": "ok", "redis": "ok", "broker": "ok"}


@pytest.mark.parametrize("down", ["redis", "broker", "database"])
async def test_not_ready_names_the_dependency_that_is_down(settings: Settings, down: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    changes: dict[str, object] = {"health_timeout_s": 1.5}
    if down == "redis":
        changes["redis_url"] = f"redis://{dead}/0"
        # The broker defaults to REDIS_URL; keep it on the live server for this case.
        changes["celery"] = settings.celery.model_copy(update={"broker_url": settings.broker_url})
    if down == "database":
        changes["database_url"] = f"postgresql+psycopg://postgres@{dead}/postgres"
    broken = settings.model_copy(update=changes)
    if down == "broker":
        broken = broken.model_copy(
            update={
                "celery": settings.celery.model_copy(update={"broker_url": f"redis://{dead}/0"})
            }
        )
    app = create_app(broken, celery=create_celery_app(broken))
    async for c in client_for(app, None):
        r = await c.get("/health/ready")
    assert r.status_code == 503
    body = r.json()
    assert body["error"] == "dependency_unavailable"
    assert down in body["detail"]
    assert body["checks"][down] != "ok"
    assert [name for name, result in body["checks"].items() if result != "ok"] == [down]
