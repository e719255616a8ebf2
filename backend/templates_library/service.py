"""Templates: the built-in library and the ones a workspace publishes from its own
workflows. Instantiating fills the parameters in and saves a draft through the same
validator every save uses, so a template that does not fit the workspace (an agent id
from elsewhere, a missing parameter) is refused with the field at fault."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select

from backend.activity.service import record
from backend.auth.dependencies import WorkspaceAccess
from backend.kit.db import UnitOfWork
from backend.kit.errors import Conflict, NotFound, ValidationFailed
from backend.models import Workflow, WorkflowTemplate
from backend.templates_library import library
from backend.templates_library.schemas import Instantiate, Publish, TemplateRead
from backend.workflows import service as workflows
from backend.workflows.graph import REFERENCE_FIELDS, node_configs
from backend.workflows.schemas import WorkflowCreate, WorkflowRead

# Parameter kinds whose value is an id of the workspace (checked by the validator).
ID_KINDS = {"agent": "agent_id", "credential": "credential_id"}


def _builtin(t: library.Template, full: bool) -> dict[str, Any]:
    out = {
        "id": t.id, "source": "builtin", "name": t.name, "description": t.description,
        "category": t.category, "parameters": [p.as_dict() for p in t.parameters],
        "preview": library.preview(t.definition),
    }  # fmt: skip
    if full:
        out["definition"] = t.definition
    return out


def _published(t: WorkflowTemplate, full: bool) -> dict[str, Any]:
    out = {
        "id": str(t.id), "source": "workspace", "name": t.name,
        "description": t.description, "category": t.category, "parameters": t.parameters,
        "preview": library.preview(t.definition),
    }  # fmt: skip
    if full:
        out["definition"] = t.definition
    return out


async def _own(uow: UnitOfWork, access: WorkspaceAccess, template_id: str) -> WorkflowTemplate:
    try:
        key = uuid.UUID(template_id)
    except ValueError as exc:
        raise NotFound("template not found") from exc
    row = await uow.session.get(WorkflowTemplate, key)
    if row is None or row.workspace_id != access.workspace.id:
        raise NotFound("template not found")
    return row


async def list_templates(
    uow: UnitOfWork, access: WorkspaceAccess, category: str | None
) -> list[dict[str, Any]]:
    rows = await uow.session.scalars(
        select(WorkflowTemplate)
        .where(WorkflowTemplate.workspace_id == access.workspace.id)
        .order_by(WorkflowTemplate.name, WorkflowTemplate.id)
        .limit(500)
    )
    items = [_builtin(t, False) for t in library.TEMPLATES]
    items += [_published(t, False) for t in rows.all()]
    return [i for i in items if category is None or i["category"] == category]


async def get(uow: UnitOfWork, access: WorkspaceAccess, template_id: str) -> TemplateRead:
    if template_id in library.BY_ID:
        return TemplateRead.model_validate(_builtin(library.BY_ID[template_id], True))
    return TemplateRead.model_validate(_published(await _own(uow, access, template_id), True))


def _values(parameters: list[dict[str, Any]], given: dict[str, Any]) -> dict[str, Any]:
    known = {p["name"] for p in parameters}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValidationFailed(
            f"unknown parameter {unknown[0]!r} (this template takes: "
            f"{', '.join(sorted(known)) or 'none'})",
            field=f"parameters.{unknown[0]}",
        )
    values: dict[str, Any] = {}
    for p in parameters:
        value = given.get(p["name"], p.get("default"))
        if value is None:
            if p.get("required", True):
                raise ValidationFailed(
                    f"parameter {p['name']!r} is required ({p.get('description', '')})",
                    field=f"parameters.{p['name']}",
                )
            continue
        if p["kind"] in ID_KINDS:
            try:
                value = str(uuid.UUID(str(value)))
            except ValueError as exc:
                raise ValidationFailed(
                    f"parameter {p['name']!r} must be the id of a {p['kind']}",
                    field=f"parameters.{p['name']}",
                ) from exc
        values[p["name"]] = value
    return values


async def instantiate(
    uow: UnitOfWork, access: WorkspaceAccess, template_id: str, data: Instantiate
) -> WorkflowRead:
    template = await get(uow, access, template_id)
    values = _values([p.model_dump() for p in template.parameters], data.parameters)
    definition = library.substitute(template.definition, values)
    return await workflows.create(
        uow,
        access,
        WorkflowCreate(
            name=(data.name or template.name)[:200],
            description=template.description[:5000],
            tags=["template"],
            nodes=definition.get("nodes", []),
            connections=definition.get("connections", []),
            settings=definition.get("settings", {}),
        ),
    )


def _parameterise(definition: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every agent and credential the workflow names becomes a parameter, defaulting to
    the id it had, so members can point a copy at their own."""
    found: dict[str, tuple[str, str]] = {}
    for config in node_configs(definition):
        for kind, field_name in ID_KINDS.items():
            value = config.get(field_name)
            if isinstance(value, str) and value not in found:
                found[value] = (
                    f"{kind}_{sum(1 for k, _ in found.values() if k == kind) + 1}",
                    kind,
                )
    params = [
        {"name": name, "kind": kind, "description": f"The {kind} to use",
         "required": True, "default": value}
        for value, (name, kind) in found.items()
    ]  # fmt: skip
    mapping = {value: f"<<{name}>>" for value, (name, _) in found.items()}

    def swap(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: mapping.get(v, v) if k in REFERENCE_FIELDS and isinstance(v, str) else swap(v)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [swap(v) for v in value]
        return value

    return swap(definition), params


async def publish(uow: UnitOfWork, access: WorkspaceAccess, data: Publish) -> TemplateRead:
    session = uow.session
    workflow = await session.get(Workflow, data.workflow_id)
    if workflow is None or workflow.workspace_id != access.workspace.id:
        raise NotFound("workflow not found", field="workflow_id")
    definition = (await workflows.current_version(session, workflow)).definition
    templated, params = _parameterise(definition)
    name = data.name or workflow.name
    taken = await session.scalar(
        select(WorkflowTemplate.id).where(
            WorkflowTemplate.workspace_id == access.workspace.id, WorkflowTemplate.name == name
        )
    )
    if taken is not None:
        raise Conflict(f"a template named {name!r} exists", field="name")
    row = WorkflowTemplate(
        workspace_id=access.workspace.id, name=name,
        description=workflow.description if data.description is None else data.description,
        category=data.category, definition=templated, parameters=params,
        source_workflow_id=workflow.id, created_by=access.user.id,
    )  # fmt: skip
    session.add(row)
    await session.flush()
    record(
        session, access.principal, workspace_id=access.workspace.id, action="template.publish",
        resource_type="template", resource_id=row.id,
        details={"name": name, "workflow_id": str(workflow.id)},
    )  # fmt: skip
    return TemplateRead.model_validate(_published(row, True))


async def delete(uow: UnitOfWork, access: WorkspaceAccess, template_id: str) -> None:
    if template_id in library.BY_ID:
        raise Conflict("built-in templates cannot be deleted")
    row = await _own(uow, access, template_id)
    record(
        uow.session, access.principal, workspace_id=access.workspace.id,
        action="template.delete", resource_type="template", resource_id=row.id,
        details={"name": row.name},
    )  # fmt: skip
    await uow.session.delete(row)
    await uow.session.flush()
