"""Factories for workspace resources, flushed into the test's session (never committed)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from backend.models import Workflow, WorkflowVersion, Workspace

MINIMAL: dict[str, Any] = {
    "nodes": [
        {
            "id": "start",
            "type": "trigger",
            "config": {"kind": "manual"},
            "position": {"x": 0, "y": 0},
        },
        {
            "id": "shape",
            "type": "logic",
            "config": {"kind": "transform", "template": '{"ok": true}'},
        },
    ],
    "connections": [{"source": "start", "target": "shape"}],
    "settings": {},
}


async def make_workflow(
    session: AsyncSession,
    workspace: Workspace,
    *,
    name: str = "Flow",
    definition: dict[str, Any] | None = None,
    status: str = "draft",
    tags: list[str] | None = None,
) -> Workflow:
    workflow = Workflow(
        id=uuid.uuid4(),
        workspace_id=workspace.id,
        name=name,
        status=status,
        tags=tags or [],
        current_version=1,
    )
    session.add(workflow)
    await session.flush()
    session.add(
        WorkflowVersion(workflow_id=workflow.id, number=1, definition=definition or MINIMAL)
    )
    await session.flush()
    return workflow


# Resource model -> factory, for tests that need "some row of this kind" in a workspace.
FACTORIES: dict[type[Any], Callable[[AsyncSession, Workspace], Awaitable[Any]]] = {
    Workflow: make_workflow,
}
