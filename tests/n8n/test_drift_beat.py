"""Drift through the processes it runs in: an environment made on a real uvicorn, a hand
edit on the (stand-in) instance, then `n8n.drift_due` sent as beat sends it, by name
through the broker to a real worker, which checks the environment, opens the incident
with the diff and notifies the workspace's owner (kind n8n_drift)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import Session

from backend.models import (
    N8nDriftIncident,
    N8nEnvironment,
    N8nInstance,
    UserNotification,
    WorkspaceMember,
)
from tests.n8n.standin import StandIn, running

N8N = "/api/v1/n8n"


@pytest.fixture
def api(uvicorn_api: str) -> str:
    """The real uvicorn (this package's own `api` is an in-process client)."""
    return uvicorn_api


@pytest.fixture(scope="module")
def drift_server() -> Iterator[StandIn]:
    with running() as s:
        yield s


@pytest.mark.xdist_group("crossprocess")
@pytest.mark.usefixtures("worker_name")
def test_beat_drift_pass_opens_an_incident_in_a_real_worker(
    api: str,
    owner: dict[str, str],
    drift_server: StandIn,
    database: str,
) -> None:
    from backend.kit.celery_app import celery_app

    drift_server.reset()
    wf = drift_server.add_workflow("Payroll", nodes=2)
    with httpx.Client(base_url=api, headers=owner, timeout=30) as client:
        body = {"name": f"n8n-{uuid.uuid4().hex[:6]}", "base_url": drift_server.base,
                "api_key": drift_server.api_key}  # fmt: skip
        r = client.post(f"{N8N}/instances", json=body)
        assert r.status_code == 201, r.text
        iid = r.json()["id"]
        r = client.post(f"{N8N}/environments", json={"instance_id": iid, "stage": "production"})
        assert r.status_code == 201, r.text
        env_id = uuid.UUID(r.json()["id"])
    engine = create_engine(database.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        # Beat's first pass over the new environment adopts its baselines.
        celery_app.send_task("n8n.drift_due")
        deadline = time.monotonic() + 60
        while True:
            with Session(engine) as s:
                env = s.get(N8nEnvironment, env_id)
                assert env is not None
                if env.baseline_adopted_at is not None:
                    break
            assert time.monotonic() < deadline, "beat's drift pass did not adopt the baselines"
            time.sleep(0.2)
        # A hand edit, and the environment due again (as if its last check were long ago).
        drift_server.workflows[wf["id"]]["nodes"][1]["parameters"] = {"amount": "9999"}
        with Session(engine) as s:
            s.execute(
                update(N8nEnvironment)
                .where(N8nEnvironment.id == env_id)
                .values(drift_checked_at=None)
            )
            s.commit()
        celery_app.send_task("n8n.drift_due")
        deadline = time.monotonic() + 60
        incident: N8nDriftIncident | None = None
        while incident is None:
            with Session(engine) as s:
                incident = s.scalar(
                    select(N8nDriftIncident).where(N8nDriftIncident.environment_id == env_id)
                )
            assert time.monotonic() < deadline, "beat's drift pass opened no incident"
            time.sleep(0.2)
        assert incident.kind == "changed" and incident.status == "open"
        assert incident.diff == [{"kind": "node_changed", "node": "Step 1",
                                  "type": "n8n-nodes-base.set",
                                  "changes": [{"path": "parameters.amount", "change": "added",
                                               "after": "9999"}]}]  # fmt: skip
        with Session(engine) as s:
            owners = s.scalars(
                select(WorkspaceMember.user_id).where(
                    WorkspaceMember.workspace_id == incident.workspace_id
                )
            ).all()
            kinds = s.scalars(
                select(UserNotification.kind).where(UserNotification.user_id.in_(owners))
            ).all()
        assert "n8n_drift" in kinds
    finally:
        with Session(engine) as s:
            # Disabled: no later beat pass (sync, drift, nightly) meets this instance.
            s.execute(update(N8nInstance).where(N8nInstance.id == uuid.UUID(iid))
                      .values(enabled=False))  # fmt: skip
            s.commit()
        engine.dispose()
