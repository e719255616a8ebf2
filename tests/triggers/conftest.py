"""Helpers for trigger tests: published workflows with trigger nodes, synced the way a
save syncs them; committed variants for tests that need several connections."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from backend.kit.db import create_sessionmaker
from backend.models import Workflow, Workspace
from backend.triggers import service as triggers
from tests.support.factories import make_workflow


def with_trigger(config: dict[str, Any], node_id: str = "start") -> dict[str, Any]:
    return {
        "nodes": [
            {"id": node_id, "type": "trigger", "config": config},
            {
                "id": "shape",
                "type": "logic",
                "config": {"kind": "transform", "template": "{{ trigger }}"},
            },
        ],
        "connections": [{"source": node_id, "target": "shape"}],
        "settings": {},
    }


async def published(
    session: AsyncSession,
    workspace: Workspace,
    definition: dict[str, Any],
    *,
    now: datetime | None = None,
) -> Workflow:
    workflow = await make_workflow(session, workspace, definition=definition, status="published")
    await triggers.sync(session, workflow, definition, now=now)
    return workflow


@pytest.fixture
async def committed(
    engine: AsyncEngine,
) -> AsyncIterator[tuple[async_sessionmaker[AsyncSession], Callable[[], Awaitable[Workspace]]]]:
    """A real sessionmaker (commits are commits) and a maker of workspaces that are
    deleted, with everything in them, after the test."""
    maker = create_sessionmaker(engine)
    made: list[uuid.UUID] = []

    async def new_workspace() -> Workspace:
        async with maker() as session:
            workspace = Workspace(name="Committed", slug=f"c-{uuid.uuid4().hex[:12]}")
            session.add(workspace)
            await session.commit()
            made.append(workspace.id)
            return workspace

    yield maker, new_workspace
    async with maker() as session:
        await session.execute(delete(Workspace).where(Workspace.id.in_(made)))
        await session.commit()
