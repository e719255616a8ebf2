"""Workflows: saving (each save of the graph is a new immutable version), status,
duplication, export and import. Every save goes through the graph validator the engine
uses, with the workspace's agents, credentials and workflows as its context."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import Select, bindparam, cast, func, or_, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from backend.activity.service import record
from backend.auth.dependencies import WorkspaceAccess
from backend.kit import rawsql
from backend.kit.db import UnitOfWork
from backend.kit.errors import Conflict, InvalidTransition, NotFound, ValidationFailed
from backend.kit.repository import Repository
from backend.models import Agent, Credential, N8nInstance, Workflow, WorkflowVersion
from backend.triggers import service as triggers
from backend.workflows.graph import (
    REFERENCE_FIELDS,
    Context,
    GraphInvalid,
    ValidGraph,
    definition_size_problem,
    event_sources,
    node_configs,
    referenced_workflows,
    validate,
)
from backend.workflows.schemas import (
    ExportDocument,
    ImportRequest,
    Sort,
    WorkflowCreate,
    WorkflowRead,
    WorkflowSummary,
    WorkflowUpdate,
)

# The status machine of a workflow definition (not of a run).
TRANSITIONS = {
    "draft": {"published"},
    "published": {"archived"},
    "archived": {"draft"},
}


class WorkflowRepository(Repository[Workflow]):
    model = Workflow


class VersionRepository(Repository[WorkflowVersion]):
    model = WorkflowVersion


async def lock_references(session: AsyncSession, workspace_id: uuid.UUID) -> None:
    """Serialise reference checks within a workspace until commit: two saves at once
    (A calls B, B calls A) would each pass against the other's old version."""
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
        {"key": f"references:{workspace_id}"},
    )


async def validation_context(
    session: AsyncSession, workspace_id: uuid.UUID, workflow_id: uuid.UUID | None
) -> Context:
    """Everything the validator may ask about the workspace, in six queries."""
    rows = await session.execute(
        select(Workflow.id, WorkflowVersion.definition)
        .join(
            WorkflowVersion,
            (WorkflowVersion.workflow_id == Workflow.id)
            & (WorkflowVersion.number == Workflow.current_version),
        )
        .where(Workflow.workspace_id == workspace_id)
    )
    definitions = rows.all()
    refs = {wid: referenced_workflows(definition) for wid, definition in definitions}
    sources = {wid: event_sources(definition) for wid, definition in definitions}
    agents = await session.scalars(select(Agent.id).where(Agent.workspace_id == workspace_id))
    credentials = await session.scalars(
        select(Credential.id).where(Credential.workspace_id == workspace_id)
    )
    # The MCP domain imports this module (workflows_using); imported here, not at the top.
    from backend.mcp.service import validation_tools

    mcp_server_ids, mcp_tools = await validation_tools(session, workspace_id)
    n8n_instances = await session.scalars(
        select(N8nInstance.id).where(N8nInstance.workspace_id == workspace_id)
    )
    return Context(
        workflow_id=workflow_id,
        workflow_ids=frozenset(refs),
        agent_ids=frozenset(agents.all()),
        credential_ids=frozenset(credentials.all()),
        mcp_server_ids=mcp_server_ids,
        mcp_tools=mcp_tools,
        n8n_instance_ids=frozenset(n8n_instances.all()),
        references=lambda wid: refs.get(wid, ()),
        event_sources=lambda wid: sources.get(wid, ()),
    )


async def check(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    workflow_id: uuid.UUID | None,
    definition: dict[str, Any],
) -> ValidGraph:
    too_large = definition_size_problem(definition)
    if too_large is not None:  # before the lock, and before anything is parsed
        raise ValidationFailed(too_large.message, field="nodes", problems=[too_large.as_dict()])
    await lock_references(session, workspace_id)
    ctx = await validation_context(session, workspace_id, workflow_id)
    try:
        # In a thread: a large definition's templates take seconds to parse, and on the
        # event loop that held every other request of this process (45 s for 10 MB).
        return await asyncio.to_thread(validate, definition, ctx)
    except GraphInvalid as exc:
        first = exc.problems[0]
        where = ".".join(p for p in (first.node_id and f"nodes.{first.node_id}", first.field) if p)
        raise ValidationFailed(
            f"{where}: {first.message}" if where else first.message,
            field=where or None,
            problems=[p.as_dict() for p in exc.problems],
        ) from exc


def _definition(parts: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    base = base or {"nodes": [], "connections": [], "settings": {}}
    return {
        "nodes": parts.nodes if parts.nodes is not None else base.get("nodes", []),
        "connections": parts.connections
        if parts.connections is not None
        else base.get("connections", []),
        "settings": parts.settings if parts.settings is not None else base.get("settings", {}),
    }


async def current_version(session: AsyncSession, workflow: Workflow) -> WorkflowVersion:
    version = await session.scalar(
        select(WorkflowVersion).where(
            WorkflowVersion.workflow_id == workflow.id,
            WorkflowVersion.number == workflow.current_version,
        )
    )
    assert version is not None, "a workflow always has its current version"
    return version


def to_read(workflow: Workflow, definition: dict[str, Any]) -> WorkflowRead:
    return WorkflowRead.model_validate(
        {
            **{
                c: getattr(workflow, c)
                for c in (
                    "id",
                    "workspace_id",
                    "name",
                    "description",
                    "status",
                    "tags",
                    "current_version",
                    "created_by",
                    "created_at",
                    "updated_at",
                )
            },
            "nodes": definition.get("nodes", []),
            "connections": definition.get("connections", []),
            "settings": definition.get("settings", {}),
        }
    )


async def _create(
    uow: UnitOfWork,
    access: WorkspaceAccess,
    *,
    name: str,
    description: str,
    tags: list[str],
    definition: dict[str, Any],
    action: str,
    details: dict[str, Any] | None = None,
) -> WorkflowRead:
    session = uow.session
    workflow_id = uuid.uuid4()
    valid = await check(session, access.workspace.id, workflow_id, definition)
    workflow = Workflow(
        id=workflow_id, workspace_id=access.workspace.id, name=name, description=description,
        tags=sorted(set(tags)), current_version=1, created_by=access.user.id,
    )  # fmt: skip
    session.add(workflow)
    await session.flush()
    session.add(
        WorkflowVersion(
            workflow_id=workflow.id,
            number=1,
            definition=valid.definition,
            created_by=access.user.id,
        )
    )
    await session.flush()
    await triggers.sync(session, workflow, valid.definition)
    record(
        session,
        access.principal,
        workspace_id=access.workspace.id,
        action=action,
        resource_type="workflow",
        resource_id=workflow.id,
        details=details,
    )
    return to_read(workflow, valid.definition)


async def create(uow: UnitOfWork, access: WorkspaceAccess, data: WorkflowCreate) -> WorkflowRead:
    return await _create(
        uow, access, name=data.name, description=data.description, tags=data.tags,
        definition=_definition(data), action="workflow.create",
    )  # fmt: skip


# What a list shows of a workflow: columns, read as rows (no ORM objects on a hot path).
SUMMARY_COLUMNS = (
    Workflow.id,
    Workflow.workspace_id,
    Workflow.name,
    Workflow.description,
    Workflow.status,
    Workflow.tags,
    Workflow.current_version,
    Workflow.created_by,
    Workflow.created_at,
    Workflow.updated_at,
)


async def get(uow: UnitOfWork, access: WorkspaceAccess) -> WorkflowRead:
    """The workflow `load_for_read` read (GET /workflows/{id}): no statement of its own."""
    return to_read(access.resource, access.resource.definition)


async def load_for_read(session: AsyncSession, workflow_id: uuid.UUID) -> Any:
    """The workflow's columns and its current definition (a named tuple, or None), one
    statement and no ORM objects: what GET /workflows/{id} checks access on and
    answers with."""
    return await rawsql.fetch_one(session, READ_STATEMENT, {"workflow_id": workflow_id})


READ_STATEMENT = (
    select(*SUMMARY_COLUMNS, WorkflowVersion.definition)
    .join(
        WorkflowVersion,
        (WorkflowVersion.workflow_id == Workflow.id)
        & (WorkflowVersion.number == Workflow.current_version),
    )
    .where(Workflow.id == bindparam("workflow_id"))
)


async def list_workflows(
    uow: UnitOfWork,
    access: WorkspaceAccess,
    *,
    status: str | None,
    tag: str | None,
    q: str | None,
    sort: Sort,
    limit: int,
    offset: int,
) -> tuple[list[WorkflowSummary], int]:
    """One page and the total, in one statement (the total rides on each row as a
    window count); a second one only for a page past the end, which has no rows."""
    params = list_filters(access.workspace_id, status, tag)
    # Built once per shape: a request binds its values, no statement to construct and
    # no cache key to compute (a search adds its condition to a copy).
    stmt, page = list_statements(bool(status), bool(tag), sort)
    page_params = {**params, "limit": limit, "offset": offset}
    rows: Sequence[Any]
    if q:
        # autoescape: a % or _ in the query is a character, not a wildcard.
        search = or_(
            Workflow.name.icontains(q, autoescape=True),
            Workflow.description.icontains(q, autoescape=True),
        )
        stmt, page = stmt.where(search), page.where(search)
        rows = [r._mapping for r in (await uow.session.execute(page, page_params)).all()]
    else:
        # The prebuilt statement, through the driver (backend/kit/rawsql.py).
        rows = await rawsql.fetch_dicts(uow.session, page, page_params)
    if rows:
        total = int(rows[0]["total"])
    elif offset == 0:
        total = 0
    else:
        total = int(
            await uow.session.scalar(select(func.count()).select_from(stmt.subquery()), params) or 0
        )
    return summaries(rows), total


# One validation call for a page of rows (half the CPU of one model_validate per row).
_SUMMARIES = TypeAdapter(list[WorkflowSummary])


def summaries(rows: Sequence[Any]) -> list[WorkflowSummary]:
    return _SUMMARIES.validate_python(rows)


def list_filters(workspace_id: uuid.UUID, status: str | None, tag: str | None) -> dict[str, Any]:
    """The bound values of list_statements' filters."""
    params: dict[str, Any] = {"workspace_id": workspace_id}
    if status:
        params["status"] = status
    if tag:
        params["tags"] = [tag]
    return params


@functools.cache
def list_statements(
    status: bool, tag: bool, sort: Sort
) -> tuple[Select[*tuple[Any, ...]], Select[*tuple[Any, ...]]]:
    """(the filtered rows, one page of them with the total), with bound parameters for
    the workspace, the filters asked for, limit and offset."""
    stmt = select(*SUMMARY_COLUMNS).where(Workflow.workspace_id == bindparam("workspace_id"))
    if status:
        stmt = stmt.where(Workflow.status == bindparam("status"))
    if tag:
        # Array containment: served by the GIN index on tags.
        stmt = stmt.where(Workflow.tags.contains(cast(bindparam("tags"), Workflow.tags.type)))
    column = getattr(Workflow, sort.lstrip("-"))
    page = (
        stmt.add_columns(func.count().over().label("total"))
        .order_by(column.desc() if sort.startswith("-") else column.asc(), Workflow.id)
        .limit(bindparam("limit"))
        .offset(bindparam("offset"))
    )
    return stmt, page


async def update(
    uow: UnitOfWork, access: WorkspaceAccess, data: WorkflowUpdate, if_match: int | None
) -> WorkflowRead:
    session = uow.session
    # Row lock: two saves of the same workflow are serialised, so the version check
    # below sees the other's result instead of both writing version n+1.
    workflow = await session.get(
        Workflow, access.resource.id, with_for_update=True, populate_existing=True
    )
    if workflow is None:
        raise NotFound("workflow not found")
    if data.version is not None and if_match is not None and data.version != if_match:
        raise ValidationFailed("version and If-Match disagree", field="version")
    expected = data.version or if_match
    if expected is not None and expected != workflow.current_version:
        raise Conflict(
            f"workflow is at version {workflow.current_version}, not {expected}; "
            "reload and reapply your change",
            field="version", current_version=workflow.current_version,
        )  # fmt: skip
    current = await current_version(session, workflow)
    changed: list[str] = []
    definition = current.definition
    if data.nodes is not None or data.connections is not None or data.settings is not None:
        definition = (
            await check(
                session, workflow.workspace_id, workflow.id, _definition(data, current.definition)
            )
        ).definition
        if definition != current.definition:
            workflow.current_version += 1
            session.add(
                WorkflowVersion(
                    workflow_id=workflow.id,
                    number=workflow.current_version,
                    definition=definition,
                    created_by=access.user.id,
                )
            )
            changed.append("definition")
    for name in ("name", "description"):
        value = getattr(data, name)
        if value is not None and value != getattr(workflow, name):
            setattr(workflow, name, value)
            changed.append(name)
    if data.tags is not None and sorted(set(data.tags)) != workflow.tags:
        workflow.tags = sorted(set(data.tags))
        changed.append("tags")
    if changed:
        await session.flush()
        if "definition" in changed:
            await triggers.sync(session, workflow, definition)
        record(
            session,
            access.principal,
            workspace_id=workflow.workspace_id,
            action="workflow.update",
            resource_type="workflow",
            resource_id=workflow.id,
            details={"fields": changed, "version": workflow.current_version},
        )
    return to_read(workflow, definition)


async def delete(uow: UnitOfWork, access: WorkspaceAccess) -> None:
    workflow: Workflow = access.resource
    # Sub-workflow calls, for_each bodies and event triggers all name it by workflow_id.
    users = await workflows_using(uow.session, workflow.workspace_id, "workflow_id", workflow.id)
    if users:
        raise Conflict(f"other workflows call this one: {', '.join(users)}", workflows=users)
    record(
        uow.session,
        access.principal,
        workspace_id=workflow.workspace_id,
        action="workflow.delete",
        resource_type="workflow",
        resource_id=workflow.id,
        details={"name": workflow.name},
    )
    await uow.session.delete(workflow)
    await uow.session.flush()


async def change_status(uow: UnitOfWork, access: WorkspaceAccess, status: str) -> WorkflowRead:
    session = uow.session
    workflow = await session.get(
        Workflow, access.resource.id, with_for_update=True, populate_existing=True
    )
    assert workflow is not None
    if status not in TRANSITIONS[workflow.status]:
        raise InvalidTransition(
            f"a {workflow.status} workflow cannot become {status}", field="status"
        )
    definition = (await current_version(session, workflow)).definition
    if status == "published":
        # The workspace may have changed since the save (a credential deleted).
        await check(session, workflow.workspace_id, workflow.id, definition)
    old, workflow.status = workflow.status, status
    await session.flush()
    # Triggers fire only for published workflows.
    await triggers.sync(session, workflow, definition)
    record(
        session,
        access.principal,
        workspace_id=workflow.workspace_id,
        action="workflow.status",
        resource_type="workflow",
        resource_id=workflow.id,
        details={"from": old, "to": status},
    )
    return to_read(workflow, definition)


async def duplicate(uow: UnitOfWork, access: WorkspaceAccess) -> WorkflowRead:
    source: Workflow = access.resource
    definition = (await current_version(uow.session, source)).definition
    return await _create(
        uow, access, name=f"Copy of {source.name}"[:200], description=source.description,
        tags=source.tags, definition=definition, action="workflow.duplicate",
        details={"source_workflow_id": str(source.id)},
    )  # fmt: skip


async def list_versions(
    uow: UnitOfWork, access: WorkspaceAccess, *, limit: int, offset: int
) -> tuple[Sequence[WorkflowVersion], int]:
    stmt = (
        select(WorkflowVersion)
        .where(WorkflowVersion.workflow_id == access.resource.id)
        .order_by(WorkflowVersion.number.desc())
    )
    return await VersionRepository(uow.session).paginate(stmt, limit=limit, offset=offset)


async def get_version(uow: UnitOfWork, access: WorkspaceAccess, number: int) -> WorkflowVersion:
    version = await uow.session.scalar(
        select(WorkflowVersion).where(
            WorkflowVersion.workflow_id == access.resource.id, WorkflowVersion.number == number
        )
    )
    if version is None:
        raise NotFound(f"version {number} not found")
    return version


def _references(definition: dict[str, Any]) -> dict[str, list[uuid.UUID]]:
    found: dict[str, set[uuid.UUID]] = {name: set() for name in REFERENCE_FIELDS}
    for config in node_configs(definition):
        for name in REFERENCE_FIELDS:
            value = config.get(name)
            if value:
                try:
                    found[name].add(uuid.UUID(str(value)))
                except ValueError:
                    continue
    return {name: sorted(ids, key=str) for name, ids in found.items() if ids}


async def export(uow: UnitOfWork, access: WorkspaceAccess) -> ExportDocument:
    workflow: Workflow = access.resource
    definition = (await current_version(uow.session, workflow)).definition
    return ExportDocument(
        name=workflow.name, description=workflow.description, tags=workflow.tags,
        definition=definition,
        references=_references(definition), source_workflow_id=workflow.id,
        source_version=workflow.current_version, exported_at=datetime.now(UTC),
    )  # fmt: skip


def _remap(definition: dict[str, Any], id_map: dict[uuid.UUID, uuid.UUID]) -> dict[str, Any]:
    """A copy of the definition with every reference id passed through id_map. Anything
    malformed is left as it is, for the validator to explain."""
    raw_nodes = definition.get("nodes")
    if not isinstance(raw_nodes, list):
        return definition

    def mapped(value: Any) -> Any:
        try:
            return str(id_map.get(uuid.UUID(str(value)), value))
        except ValueError:
            return value

    def fix_config(config: dict[str, Any]) -> dict[str, Any]:
        out = dict(config)
        for name in REFERENCE_FIELDS:
            if isinstance(out.get(name), str):
                out[name] = mapped(out[name])
        if isinstance(out.get("body"), dict):
            out["body"] = _remap(out["body"], id_map)
        return out

    nodes = [
        {**node, "config": fix_config(node["config"])}
        if isinstance(node, dict) and isinstance(node.get("config"), dict)
        else node
        for node in raw_nodes
    ]
    return {**definition, "nodes": nodes}


async def import_workflow(
    uow: UnitOfWork, access: WorkspaceAccess, data: ImportRequest
) -> WorkflowRead:
    doc = data.document
    definition = _remap(doc.definition, data.id_map)
    # References that leave this workspace fail validation like any other save.
    return await _create(
        uow, access, name=data.name or doc.name, description=doc.description, tags=doc.tags,
        definition=definition, action="workflow.import",
        details={"source_workflow_id": str(doc.source_workflow_id or "") or None},
    )  # fmt: skip


async def workflows_using(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    field: str,
    target: uuid.UUID,
    *,
    published_only: bool = False,
) -> list[str]:
    """Names of workflows whose current version references `target` in `field`
    (ids are stored canonically by the validator, so strings compare safely)."""
    stmt = (
        select(Workflow.name, WorkflowVersion.definition)
        .join(
            WorkflowVersion,
            (WorkflowVersion.workflow_id == Workflow.id)
            & (WorkflowVersion.number == Workflow.current_version),
        )
        .where(Workflow.workspace_id == workspace_id)
    )
    if published_only:
        stmt = stmt.where(Workflow.status == "published")
    rows = await session.execute(stmt)
    wanted = str(target)
    return sorted(
        name
        for name, definition in rows.all()
        if any(c.get(field) == wanted for c in node_configs(definition))
    )


async def workflows_using_credential(
    session: AsyncSession, workspace_id: uuid.UUID, credential_id: uuid.UUID
) -> list[str]:
    return await workflows_using(
        session, workspace_id, "credential_id", credential_id, published_only=True
    )
