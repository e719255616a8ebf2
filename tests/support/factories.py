"""Model factories (factory-boy) for tests, and the helpers that put what they build into
the test's own session: added and flushed, never committed, so the test's transaction
(or the caller's unit of work) decides what lasts.

factory-boy's SQLAlchemy factory drives only a synchronous Session, so the factories
here are plain `Factory` builders and `create()` does the add + flush on the
test's AsyncSession. Parents are passed in (`workspace_id=...`) rather than made by
SubFactory: making a parent needs an await that a factory declaration cannot do."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from factory.base import Factory
from factory.declarations import LazyAttribute, LazyFunction
from sqlalchemy.ext.asyncio import AsyncSession

from backend.config import get_settings
from backend.kit.crypto import SecretBox, new_token
from backend.models import (
    Agent,
    Credential,
    File,
    McpServer,
    N8nDriftIncident,
    N8nEnvironment,
    N8nInstance,
    N8nPipeline,
    N8nPromotion,
    N8nSnapshot,
    Task,
    User,
    Workflow,
    WorkflowExecution,
    WorkflowVersion,
    Workspace,
    WorkspaceMember,
)

M = TypeVar("M")

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


def unique_email(tag: str = "u") -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}@example.com"


def unique_slug(tag: str = "ws") -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


class UserFactory(Factory[User]):
    class Meta:
        model = User

    id = LazyFunction(uuid.uuid4)
    email = LazyFunction(unique_email)
    name = "Test User"


class WorkspaceFactory(Factory[Workspace]):
    class Meta:
        model = Workspace

    id = LazyFunction(uuid.uuid4)
    name = "Team"
    slug = LazyFunction(unique_slug)


class WorkspaceMemberFactory(Factory[WorkspaceMember]):
    """Needs workspace_id and user_id."""

    class Meta:
        model = WorkspaceMember

    id = LazyFunction(uuid.uuid4)
    role = "owner"


class WorkflowFactory(Factory[Workflow]):
    """Needs workspace_id; its version 1 comes from WorkflowVersionFactory (or
    `create_workflow`, which makes both)."""

    class Meta:
        model = Workflow

    id = LazyFunction(uuid.uuid4)
    name = "Flow"
    status = "draft"
    tags = LazyFunction(list)
    current_version = 1


class WorkflowVersionFactory(Factory[WorkflowVersion]):
    """Needs workflow_id; the definition is a valid two-node graph unless given."""

    class Meta:
        model = WorkflowVersion

    id = LazyFunction(uuid.uuid4)
    number = 1
    definition = LazyFunction(lambda: copy.deepcopy(MINIMAL))


class AgentFactory(Factory[Agent]):
    """Needs workspace_id."""

    class Meta:
        model = Agent

    id = LazyFunction(uuid.uuid4)
    name = "Helper"
    model = "claude-sonnet-5-5"
    max_tokens = 256


def _sealed(credential: Any) -> str:
    # Sealed the way the credentials service seals: the payload names its own row, so
    # a ciphertext moved to another row or workspace does not open.
    payload = {
        "id": str(credential.id),
        "workspace_id": str(credential.workspace_id),
        "data": credential.data,
    }
    return SecretBox(get_settings()).seal(json.dumps(payload))


class CredentialFactory(Factory[Credential]):
    """Needs workspace_id; `data` (the secret, default a bearer token) is sealed into
    secret_encrypted with the test settings' key."""

    class Meta:
        model = Credential

    class Params:
        data = LazyFunction(lambda: {"type": "bearer", "token": "factory-token"})

    id = LazyFunction(uuid.uuid4)
    name = LazyFunction(lambda: f"cred-{uuid.uuid4().hex[:6]}")
    type = LazyAttribute(lambda o: str(o.data["type"]))
    secret_encrypted = LazyAttribute(_sealed)


class WorkflowExecutionFactory(Factory[WorkflowExecution]):
    """Needs workspace_id and workflow_id (whose version 1 exists)."""

    class Meta:
        model = WorkflowExecution

    id = LazyFunction(uuid.uuid4)
    version = 1
    trigger_type = "manual"
    trigger_data = LazyFunction(dict)


async def create(session: AsyncSession, model_factory: type[Factory[M]], **fields: Any) -> M:
    """Build with `model_factory`, add to the test's session and flush (ids and server
    defaults are then known; nothing is committed)."""
    row = model_factory.build(**fields)
    session.add(row)
    await session.flush()
    return row


async def create_workflow(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    definition: dict[str, Any] | None = None,
    **fields: Any,
) -> Workflow:
    """A workflow with its version 1 (`definition`, MINIMAL by default)."""
    workflow = await create(session, WorkflowFactory, workspace_id=workspace_id, **fields)
    version: dict[str, Any] = {} if definition is None else {"definition": definition}
    await create(session, WorkflowVersionFactory, workflow_id=workflow.id, **version)
    return workflow


# The helpers below are the older per-workspace spelling, kept because many modules
# (some owned by others right now) call them; they go through the factories.


async def make_workflow(
    session: AsyncSession,
    workspace: Workspace,
    *,
    name: str = "Flow",
    definition: dict[str, Any] | None = None,
    status: str = "draft",
    tags: list[str] | None = None,
) -> Workflow:
    return await create_workflow(
        session, workspace.id, definition, name=name, status=status, tags=tags or []
    )


async def make_agent(
    session: AsyncSession, workspace: Workspace, *, name: str = "Helper", **fields: Any
) -> Agent:
    return await create(session, AgentFactory, workspace_id=workspace.id, name=name, **fields)


async def make_credential(
    session: AsyncSession, workspace: Workspace, *, name: str | None = None
) -> Credential:
    named: dict[str, Any] = {} if name is None else {"name": name}
    return await create(session, CredentialFactory, workspace_id=workspace.id, **named)


async def make_execution(
    session: AsyncSession, workspace: Workspace, *, status: str = "failed"
) -> WorkflowExecution:
    workflow = await create_workflow(session, workspace.id)
    return await create(
        session,
        WorkflowExecutionFactory,
        workspace_id=workspace.id,
        workflow_id=workflow.id,
        status=status,
    )


async def make_mcp_server(
    session: AsyncSession,
    workspace: Workspace,
    *,
    url: str = "http://127.0.0.1:9/mcp",
    **fields: Any,
) -> McpServer:
    """An HTTP MCP server row (not connected; its URL is refused by the default guard)."""
    server = McpServer(
        workspace_id=workspace.id,
        name=fields.pop("name", f"mcp-{uuid.uuid4().hex[:8]}"),
        transport=fields.pop("transport", "streamable_http"),
        url=url,
        **fields,
    )
    session.add(server)
    await session.flush()
    return server


async def make_file(session: AsyncSession, workspace: Workspace, **fields: Any) -> File:
    """A files row (metadata only: no bytes in storage)."""
    file_id = uuid.uuid4()
    file = File(
        id=file_id,
        workspace_id=workspace.id,
        name=fields.pop("name", "notes.txt"),
        size=fields.pop("size", 5),
        content_type=fields.pop("content_type", "text/plain"),
        sha256=fields.pop("sha256", "0" * 64),
        storage_key=f".uploads/{file_id}",
        **fields,
    )
    session.add(file)
    await session.flush()
    return file


async def make_task(session: AsyncSession, workspace: Workspace, **fields: Any) -> Task:
    """An open manual task anyone in the workspace may decide (min_role viewer)."""
    task = Task(
        workspace_id=workspace.id,
        kind="manual",
        status="open",
        title=fields.pop("title", "Check this"),
        min_role=fields.pop("min_role", "viewer"),
        **fields,
    )
    session.add(task)
    await session.flush()
    return task


async def make_n8n_instance(
    session: AsyncSession,
    workspace: Workspace,
    *,
    base_url: str = "http://127.0.0.1:9",
    api_key: str = "n8n-test-key",
    **fields: Any,
) -> N8nInstance:
    """An n8n instance row (never tested; its URL is refused by the default guard)."""
    from backend.n8n.service import Secrets, seal

    instance = N8nInstance(
        id=uuid.uuid4(),
        workspace_id=workspace.id,
        name=fields.pop("name", f"n8n-{uuid.uuid4().hex[:8]}"),
        base_url=base_url,
        capabilities={},
        notify={},
        **fields,
    )
    seal(get_settings(), instance, Secrets(api_key, new_token("n8n_"), new_token()))
    session.add(instance)
    await session.flush()
    return instance


async def make_n8n_environment(session: AsyncSession, workspace: Workspace) -> N8nEnvironment:
    instance = await make_n8n_instance(session, workspace)
    env = N8nEnvironment(id=uuid.uuid4(), workspace_id=workspace.id, instance_id=instance.id,
                         stage="staging", approvals={}, allowed_hours={})  # fmt: skip
    session.add(env)
    await session.flush()
    return env


async def make_n8n_pipeline(session: AsyncSession, workspace: Workspace) -> N8nPipeline:
    env = await make_n8n_environment(session, workspace)
    name = f"p-{uuid.uuid4().hex[:8]}"
    pipeline = N8nPipeline(id=uuid.uuid4(), workspace_id=workspace.id, name=name,
                           environment_ids=[str(env.id)])  # fmt: skip
    session.add(pipeline)
    await session.flush()
    return pipeline


async def make_n8n_snapshot(session: AsyncSession, workspace: Workspace) -> N8nSnapshot:
    from backend.n8n import snapshots

    instance = await make_n8n_instance(session, workspace)
    definition = {"name": "W", "nodes": [], "connections": {}, "settings": {}}
    snap = snapshots.build(workspace_id=workspace.id, instance_id=instance.id,
                           n8n_workflow_id="wf1", definition=definition, reason="manual",
                           by_user_id=None)  # fmt: skip
    session.add(snap)
    await session.flush()
    return snap


async def make_n8n_drift_incident(session: AsyncSession, workspace: Workspace) -> N8nDriftIncident:
    env = await make_n8n_environment(session, workspace)
    incident = N8nDriftIncident(id=uuid.uuid4(), workspace_id=workspace.id,
                                environment_id=env.id, instance_id=env.instance_id,
                                n8n_workflow_id="wf1", name="W", kind="changed", status="open",
                                diff=[], detections=1)  # fmt: skip
    session.add(incident)
    await session.flush()
    return incident


async def make_n8n_promotion(session: AsyncSession, workspace: Workspace) -> N8nPromotion:
    """A plan awaiting approval from one environment to another (never executed), with
    one open approval task anyone in the workspace may decide (as make_task's)."""
    source = await make_n8n_environment(session, workspace)
    target = await make_n8n_environment(session, workspace)
    task = await make_task(session, workspace, title="Promote 'W' to production")
    promotion = N8nPromotion(
        id=uuid.uuid4(), workspace_id=workspace.id, lineage_id=uuid.uuid4(),
        from_env_id=source.id, to_env_id=target.id, source_instance_id=source.instance_id,
        source_workflow_id="wf1", target_instance_id=target.instance_id, action="create",
        matched_by="none", name="W", status="awaiting_approval",
        plan={"credentials": {"mapped": [], "missing": []}, "diff": [], "gates": []},
        body={"name": "W", "nodes": [], "connections": {}, "settings": {}}, digest="0" * 64,
        task_ids=[str(task.id)],
    )  # fmt: skip
    session.add(promotion)
    await session.flush()
    return promotion


# Resource model -> factory, for tests that need "some row of this kind" in a workspace.
FACTORIES: dict[type[Any], Callable[[AsyncSession, Workspace], Awaitable[Any]]] = {
    Workflow: make_workflow,
    Agent: make_agent,
    Credential: make_credential,
    WorkflowExecution: make_execution,
    McpServer: make_mcp_server,
    File: make_file,
    Task: make_task,
    N8nInstance: make_n8n_instance,
    N8nEnvironment: make_n8n_environment,
    N8nPipeline: make_n8n_pipeline,
    N8nSnapshot: make_n8n_snapshot,
    N8nDriftIncident: make_n8n_drift_incident,
    N8nPromotion: make_n8n_promotion,
}
