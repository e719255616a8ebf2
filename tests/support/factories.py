"""Factories for workspace resources, flushed into the test's session (never committed)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from backend.config import get_settings
from backend.kit.crypto import SecretBox
from backend.models import (
    Agent,
    Credential,
    Workflow,
    WorkflowExecution,
    WorkflowVersion,
    Workspace,
)

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


async def make_agent(
    session: AsyncSession, workspace: Workspace, *, name: str = "Helper", **fields: Any
) -> Agent:
    agent = Agent(
        workspace_id=workspace.id, name=name, model="claude-sonnet-5-5", max_tokens=256, **fields
    )
    session.add(agent)
    await session.flush()
    return agent


async def make_credential(
    session: AsyncSession, workspace: Workspace, *, name: str | None = None
) -> Credential:
    import json

    credential = Credential(
        id=uuid.uuid4(),
        workspace_id=workspace.id,
        name=name or f"cred-{uuid.uuid4().hex[:6]}",
        type="bearer",
        secret_encrypted="",
    )
    payload = {
        "id": str(credential.id),
        "workspace_id": str(workspace.id),
        "data": {"type": "bearer", "token": "factory-token"},
    }
    credential.secret_encrypted = SecretBox(get_settings()).seal(json.dumps(payload))
    session.add(credential)
    await session.flush()
    return credential


async def make_execution(
    session: AsyncSession, workspace: Workspace, *, status: str = "failed"
) -> WorkflowExecution:
    workflow = await make_workflow(session, workspace)
    execution = WorkflowExecution(
        workspace_id=workspace.id,
        workflow_id=workflow.id,
        version=1,
        trigger_type="manual",
        status=status,
    )
    session.add(execution)
    await session.flush()
    return execution


# Resource model -> factory, for tests that need "some row of this kind" in a workspace.
FACTORIES: dict[type[Any], Callable[[AsyncSession, Workspace], Awaitable[Any]]] = {
    Workflow: make_workflow,
    Agent: make_agent,
    Credential: make_credential,
    WorkflowExecution: make_execution,
}
