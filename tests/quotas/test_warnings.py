"""Quota warnings (issue 16): a workspace's owners and administrators are notified the
first time its use of a quota crosses each warning threshold in a period: in their inbox
(/api/v1/notifications), live on their own WebSocket channel, as their preferences say;
once per threshold and period, across processes. Through a real uvicorn and the
session's real Celery worker."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import create_engine, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from backend.auth.permissions import Role
from backend.config import QuotaSettings, Settings
from backend.kit.db import UnitOfWork
from backend.kit.errors import QuotaExceeded
from backend.models import (
    ActivityLog,
    NotificationPreference,
    UserNotification,
    Workspace,
    WorkspaceQuota,
)
from backend.quotas import service as quotas
from backend.quotas import warnings
from backend.quotas.service import period_bounds
from tests.support.factories import UserFactory, WorkspaceMemberFactory
from tests.support.identity import make_workspace


def test_thresholds_crossed_are_those_passed_between_before_and_after() -> None:
    assert warnings.crossed([80, 100], 5, 3, 4) == [80]
    assert warnings.crossed([80, 100], 5, 4, 5) == [100]
    assert warnings.crossed([80, 100], 5, 3, 5) == [80, 100]
    assert warnings.crossed([80, 100], 5, 4, 4) == []  # nothing moved
    assert warnings.crossed([80, 100], 5, 5, 6) == []  # already past both
    assert warnings.crossed([50], 1000.0, 499.99, 500.0) == [50]
    assert warnings.crossed([80, 100], 0, 0, 1) == []  # a quota switched off warns of nothing


@pytest.mark.parametrize("bad", [[0], [101], [-5]])
def test_warning_thresholds_are_percentages(bad: list[int]) -> None:
    with pytest.raises(ValidationError, match="percentage"):
        QuotaSettings(warn_at_percent=bad)
    assert QuotaSettings(warn_at_percent=[100, 50, 50]).warn_at_percent == [50, 100]


async def _admin(maker: async_sessionmaker[AsyncSession], ws: Workspace, role: Role) -> uuid.UUID:
    async with UnitOfWork(maker) as uow:
        user = UserFactory.build(email=f"q-{uuid.uuid4().hex[:8]}@example.com")
        uow.session.add(user)
        await uow.session.flush()
        uow.session.add(
            WorkspaceMemberFactory.build(workspace_id=ws.id, user_id=user.id, role=role.value)
        )
        return user.id


async def test_a_threshold_is_told_once_even_when_two_processes_send_it(
    maker: async_sessionmaker[AsyncSession], settings: Settings, workspace: Workspace
) -> None:
    admin = await _admin(maker, workspace, Role.ADMINISTRATOR)
    editor = await _admin(maker, workspace, Role.EDITOR)
    start, end = period_bounds("day", datetime.now(UTC))

    async def send(percent: int) -> list[uuid.UUID]:
        async with UnitOfWork(maker) as uow:
            return await warnings.warn(
                uow, settings, workspace.id, "runs_per_day", percent, start, end, 8, 10
            )

    # Two deliveries of the same crossing at once (two API processes, a redelivery).
    told = await asyncio.gather(send(80), send(80), send(80))
    assert sorted(len(t) for t in told) == [0, 0, 1] and [admin] in told
    assert await send(100) == [admin]
    async with maker() as session:
        rows = (
            await session.scalars(
                select(UserNotification).where(UserNotification.workspace_id == workspace.id)
            )
        ).all()
        logged = await session.scalar(
            select(func.count()).where(
                ActivityLog.workspace_id == workspace.id, ActivityLog.action == "quota.warning"
            )
        )
    # Only the administrator: editors do not hear of quotas.
    assert {r.user_id for r in rows} == {admin} and editor not in {r.user_id for r in rows}
    assert sorted(r.data["percent"] for r in rows) == [80, 100] and logged == 2
    first = next(r for r in rows if r.data["percent"] == 80)
    assert first.kind == "quota.warning" and "80%" in first.title
    assert "8 of 10" in first.body and end.isoformat() in first.body


def _sync_url(database: str) -> str:
    return database.replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.mark.xdist_group("crossprocess")
@pytest.mark.usefixtures("worker_name")
async def test_runs_per_day_warns_admins_at_80_and_100_percent_live_and_once(
    api: str,
    owner: dict[str, str],
    database: str,
) -> None:
    import websockets

    ws_id = uuid.UUID(owner["X-Workspace-ID"])
    engine = create_engine(_sync_url(database))
    with Session(engine) as s:
        quiet = UserFactory.build(email=f"q-{uuid.uuid4().hex[:8]}@example.com")
        editor = UserFactory.build(email=f"q-{uuid.uuid4().hex[:8]}@example.com")
        s.add_all([quiet, editor])
        s.flush()
        s.add_all(
            [
                WorkspaceMemberFactory.build(
                    workspace_id=ws_id, user_id=quiet.id, role=Role.ADMINISTRATOR.value
                ),
                WorkspaceMemberFactory.build(
                    workspace_id=ws_id, user_id=editor.id, role=Role.EDITOR.value
                ),
                # This administrator switched quota warnings off in the app.
                NotificationPreference(
                    user_id=quiet.id, preferences={"quota.warning": {"in_app": False}}
                ),
                WorkspaceQuota(workspace_id=ws_id, limits={"runs_per_day": 5}),
            ]
        )
        s.commit()
        quiet_id, editor_id = quiet.id, editor.id
    r = await asyncio.to_thread(
        httpx.post,
        f"{api}/api/v1/workflows", headers=owner, timeout=10,
        json={"name": f"q {uuid.uuid4().hex[:6]}",
              "nodes": [{"id": "start", "type": "trigger", "config": {"kind": "manual"}}],
              "connections": []},
    )  # fmt: skip
    assert r.status_code == 201, r.text
    body = {"workflow_id": r.json()["id"]}

    def start() -> int:
        return httpx.post(
            f"{api}/api/v1/executions", headers=owner, json=body, timeout=30
        ).status_code

    url = api.replace("http://", "ws://") + "/api/v1/ws"
    token = owner["Authorization"].removeprefix("Bearer ")
    async with websockets.connect(url) as sock:
        await sock.send(json.dumps({"token": token, "workspace_id": str(ws_id)}))
        await sock.send(json.dumps({"action": "subscribe", "channel": "user"}))

        async def warning() -> dict[str, Any]:
            while True:
                msg = json.loads(await asyncio.wait_for(sock.recv(), 60))
                event = msg.get("event") if msg.get("channel") == "user" else None
                note = event.get("notification") if isinstance(event, dict) else None
                if isinstance(note, dict) and note.get("kind") == "quota.warning":
                    return dict(note)

        codes = [await asyncio.to_thread(start) for _ in range(3)]
        assert codes == [202] * 3
        assert await asyncio.to_thread(start) == 202  # 4 of 5: 80%
        live = await warning()
        assert live["data"]["percent"] == 80 and live["data"]["quota"] == "runs_per_day"
        assert live["data"]["used"] == 4 and live["data"]["limit"] == 5
        assert await asyncio.to_thread(start) == 202  # 5 of 5: 100%
        assert (await warning())["data"]["percent"] == 100
        # Refusals past the limit tell nobody again.
        assert [await asyncio.to_thread(start) for _ in range(3)] == [402] * 3

    def listed() -> list[dict[str, Any]]:
        r = httpx.get(f"{api}/api/v1/notifications", headers=owner, timeout=10)
        assert r.status_code == 200, r.text
        return [n for n in r.json()["items"] if n["kind"] == "quota.warning"]

    await asyncio.sleep(2)  # room for a stray third warning from the refusals to arrive
    notes = await asyncio.to_thread(listed)
    assert sorted(n["data"]["percent"] for n in notes) == [80, 100]
    assert all(n["workspace_id"] == str(ws_id) for n in notes)
    with Session(engine) as s:
        for_quiet = s.scalar(select(func.count()).where(UserNotification.user_id == quiet_id))
        for_editor = s.scalar(select(func.count()).where(UserNotification.user_id == editor_id))
        logged = s.scalars(
            select(ActivityLog.details).where(
                ActivityLog.workspace_id == ws_id, ActivityLog.action == "quota.warning"
            )
        ).all()
        s.query(WorkspaceQuota).filter_by(workspace_id=ws_id).delete()
        s.commit()
    engine.dispose()
    assert for_quiet == 0 and for_editor == 0
    assert sorted(d["percent"] for d in logged) == [80, 100]


async def test_agent_spend_that_crosses_a_threshold_is_detected_without_an_extra_call(
    session: AsyncSession,
) -> None:
    ws = await make_workspace(session)
    await quotas.set_overrides(session, ws.id, {"ai_tokens_per_month": 1000})
    await quotas.check_ai(session, ws.id)  # 0 of 1000: the counter built, limits cached
    start, _ = period_bounds("month", datetime.now(UTC))
    key = f"{ws.id}:ai_tokens_per_month:{int(start.timestamp())}"
    await quotas.spend_ai(ws.id, 500, 0.0)  # 50%: no threshold
    assert not [k for k in warnings._sent if k.startswith(key)]
    await quotas.spend_ai(ws.id, 350, 0.0)  # 85%: the 80% one, once
    await quotas.spend_ai(ws.id, 10, 0.0)
    assert [k for k in warnings._sent if k.startswith(key)] == [f"{key}:80"]
    await quotas.spend_ai(ws.id, 200, 0.0)  # 106%: the 100% one
    assert sorted(k for k in warnings._sent if k.startswith(key)) == [f"{key}:100", f"{key}:80"]
    with pytest.raises(QuotaExceeded):
        await quotas.check_ai(session, ws.id)
