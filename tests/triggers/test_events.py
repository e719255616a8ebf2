"""Event triggers: loops refused at save, and the hook that starts listeners once."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.permissions import Role
from backend.config import Settings
from backend.kit.db import UnitOfWork
from backend.models import Notification, WorkflowExecution
from backend.triggers.hooks import execution_finished
from tests.support.factories import WorkflowExecutionFactory, create
from tests.support.identity import make_workspace, member
from tests.support.triggers import published, with_trigger


def manual() -> dict[str, Any]:
    return with_trigger({"kind": "manual"})


def on(source: str, outcomes: list[str] | None = None) -> dict[str, Any]:
    return with_trigger(
        {"kind": "event", "workflow_id": source, "on": outcomes or ["completed"]}, node_id="after"
    )


async def test_event_trigger_loops_of_any_length_are_refused_at_save(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    workspace = await make_workspace(session)
    actor = await member(session, settings, workspace, Role.EDITOR)
    headers = {**actor.headers, "X-Workspace-ID": str(workspace.id)}

    async def create(definition: dict[str, Any]) -> str:
        r = await client.post(
            "/api/v1/workflows", headers=headers, json={"name": "w", **definition}
        )
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    a = await create(manual())
    b = await create(on(a))  # A -> B
    c = await create(on(b))  # B -> C
    # C -> A would close A -> B -> C -> A.
    r = await client.put(f"/api/v1/workflows/{a}", headers=headers, json=on(c))
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "nodes.after.config.workflow_id"
    assert "loop" in r.json()["detail"]
    # Two-step loop, and a workflow listening to itself.
    r = await client.put(f"/api/v1/workflows/{a}", headers=headers, json=on(b))
    assert r.status_code == 422 and "loop" in r.json()["detail"]
    r = await client.put(f"/api/v1/workflows/{a}", headers=headers, json=on(a))
    assert r.status_code == 422
    # A chain without a loop is fine.
    assert (
        await client.put(f"/api/v1/workflows/{c}", headers=headers, json=on(a))
    ).status_code == 200


async def test_a_finished_run_starts_each_listener_once_with_its_output(
    session: AsyncSession, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    workspace = await make_workspace(session)
    source = await published(session, workspace, manual())
    completed = await published(session, workspace, on(str(source.id)))
    failed_only = await published(session, workspace, on(str(source.id), ["failed"]))
    run = await create(
        session, WorkflowExecutionFactory, workspace_id=workspace.id, workflow_id=source.id,
        status="completed", output={"shape": {"ok": True}},
    )  # fmt: skip
    for _ in range(2):  # however often the end is processed
        async with UnitOfWork(sessionmaker) as uow:
            await execution_finished(uow, run)
    started = (
        await session.scalars(
            select(WorkflowExecution).where(
                WorkflowExecution.workflow_id.in_([completed.id, failed_only.id])
            )
        )
    ).all()
    assert len(started) == 1
    assert started[0].workflow_id == completed.id
    assert started[0].trigger_type == "event"
    assert started[0].trigger_data["output"] == {"shape": {"ok": True}}
    assert started[0].trigger_data["execution_id"] == str(run.id)


async def test_cancelled_runs_start_nothing_and_notify_nobody(
    session: AsyncSession, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    workspace = await make_workspace(session)
    definition = manual()
    definition["settings"] = {"notify_on_failure": ["ops@example.com"]}
    source = await published(session, workspace, definition)
    listener = await published(session, workspace, on(str(source.id), ["completed", "failed"]))
    run = await create(
        session, WorkflowExecutionFactory, workspace_id=workspace.id, workflow_id=source.id,
        status="cancelled",
    )  # fmt: skip
    async with UnitOfWork(sessionmaker) as uow:
        await execution_finished(uow, run)
    assert (
        await session.scalars(
            select(WorkflowExecution).where(WorkflowExecution.workflow_id == listener.id)
        )
    ).all() == []
    assert (
        await session.scalars(select(Notification).where(Notification.execution_id == run.id))
    ).all() == []
    # The same run failing notifies the old-style notify_on_failure address, once.
    run.status = "failed"
    await session.flush()
    for _ in range(2):
        async with UnitOfWork(sessionmaker) as uow:
            await execution_finished(uow, run)
    notes = (
        await session.scalars(select(Notification).where(Notification.execution_id == run.id))
    ).all()
    assert [(n.channel, n.target, n.status) for n in notes] == [
        ("email", "ops@example.com", "pending")
    ]
