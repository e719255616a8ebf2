"""n8n instances of a workspace: CRUD with the key sealed, the connection test, the
workflows and executions as synced, toggling a workflow and retrying an execution on the
instance, the error workflow we install there, watches, and the daily quotas.

Every change is written to the activity log in the same transaction. A call to an
instance that fails leaves its answer on the instance's `status`/`status_reason`
(unreachable, unauthorized, ...) and is answered 502 with that reason, never a 500."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy import update as sql_update
from sqlalchemy.ext.asyncio import AsyncSession

from backend.activity.service import record
from backend.auth.dependencies import WorkspaceAccess
from backend.config import Settings
from backend.kit import signing
from backend.kit.crypto import SecretBox, hash_token, new_token
from backend.kit.db import UnitOfWork
from backend.kit.errors import Conflict, NotFound, UpstreamError, ValidationFailed
from backend.kit.logging import get_logger
from backend.kit.repository import Repository
from backend.models import (
    N8nEnvironment,
    N8nError,
    N8nExecution,
    N8nInstance,
    N8nWatch,
    N8nWorkflow,
)
from backend.n8n import client as n8n
from backend.n8n import environments, sync
from backend.n8n.api_types import Node, Workflow, WorkflowCreate
from backend.n8n.schemas import InstallErrorWorkflow, InstanceCreate, InstancePatch, Notify
from backend.quotas import service as quotas
from backend.workflows.service import workflows_using

log = get_logger(__name__)

INTAKE_PATH = "/api/v1/hooks/n8n/"
ERROR_WORKFLOW_NAME = "Orchestration Studio: report errors"


class InstanceRepository(Repository[N8nInstance]):
    model = N8nInstance


# Secrets ----------------------------------------------------------------------------------


@dataclass
class Secrets:
    api_key: str
    intake_token: str
    webhook_secret: str


def seal(settings: Settings, instance: N8nInstance, secrets: Secrets) -> None:
    # Bound to the row like credentials: a ciphertext pasted into another row won't open.
    payload = {
        "id": str(instance.id),
        "workspace_id": str(instance.workspace_id),
        "api_key": secrets.api_key,
        "intake_token": secrets.intake_token,
        "webhook_secret": secrets.webhook_secret,
    }
    instance.secrets_encrypted = SecretBox(settings).seal(json.dumps(payload))
    instance.intake_token_hash = hash_token(secrets.intake_token)


def secrets_of(settings: Settings, instance: N8nInstance) -> Secrets:
    """For calling the instance and building its intake URL; never for a response."""
    payload = json.loads(SecretBox(settings).open(instance.secrets_encrypted))
    if payload.get("id") != str(instance.id) or payload.get("workspace_id") != str(
        instance.workspace_id
    ):
        raise ValueError("n8n instance secrets do not belong to this row")
    return Secrets(
        api_key=payload["api_key"],
        intake_token=payload["intake_token"],
        webhook_secret=payload["webhook_secret"],
    )


def intake_url(settings: Settings, instance: N8nInstance, base: str) -> str:
    return base.rstrip("/") + INTAKE_PATH + secrets_of(settings, instance).intake_token


def client_of(settings: Settings, instance: N8nInstance) -> n8n.N8nClient:
    legacy = instance.capabilities.get("legacy_publish")
    return n8n.client_for(
        settings,
        instance.base_url,
        secrets_of(settings, instance).api_key,
        legacy_publish=legacy if isinstance(legacy, bool) else None,
    )


# CRUD -------------------------------------------------------------------------------------


async def _name_free(
    session: AsyncSession, workspace_id: uuid.UUID, name: str, me: uuid.UUID | None
) -> None:
    clash = await session.scalar(
        select(N8nInstance.id).where(
            N8nInstance.workspace_id == workspace_id, N8nInstance.name == name
        )
    )
    if clash is not None and clash != me:
        raise Conflict(f"an n8n instance named {name!r} exists", field="name")


async def create(
    uow: UnitOfWork, settings: Settings, access: WorkspaceAccess, data: InstanceCreate
) -> tuple[N8nInstance, str]:
    """The new instance and its webhook signing secret (shown once)."""
    await _name_free(uow.session, access.workspace.id, data.name, None)
    instance = N8nInstance(
        id=uuid.uuid4(),
        workspace_id=access.workspace.id,
        name=data.name,
        base_url=n8n.api_root(data.base_url),
        environment=data.environment,
        tags=list(dict.fromkeys(data.tags)),
        enabled=data.enabled,
        status="unknown",
        capabilities={},
        notify=data.notify.model_dump(mode="json"),
        created_by=access.user.id,
    )
    secrets = Secrets(
        api_key=data.api_key.get_secret_value(),
        intake_token=new_token("n8n_"),
        webhook_secret=signing.new_secret(),
    )
    seal(settings, instance, secrets)
    uow.session.add(instance)
    await uow.session.flush()
    record(
        uow.session,
        access.principal,
        workspace_id=access.workspace.id,
        action="n8n.instance.create",
        resource_type="n8n_instance",
        resource_id=instance.id,
        details={"name": instance.name, "base_url": instance.base_url},
    )
    return instance, secrets.webhook_secret


async def list_instances(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    *,
    environment: str | None,
    tag: str | None,
    limit: int,
    offset: int,
) -> tuple[Sequence[N8nInstance], int]:
    stmt = select(N8nInstance).where(N8nInstance.workspace_id == workspace_id)
    if environment:
        stmt = stmt.where(N8nInstance.environment == environment)
    if tag:
        stmt = stmt.where(N8nInstance.tags.contains([tag]))
    stmt = stmt.order_by(N8nInstance.name, N8nInstance.id)
    return await InstanceRepository(session).paginate(stmt, limit=limit, offset=offset)


async def update(
    uow: UnitOfWork, settings: Settings, access: WorkspaceAccess, data: InstancePatch
) -> N8nInstance:
    instance: N8nInstance = access.resource
    given = data.model_dump(exclude_unset=True)
    for name in ("name", "base_url", "environment", "tags", "enabled", "notify"):
        if name in given and given[name] is None:
            raise ValidationFailed(f"{name} cannot be null", field=name)
    if "name" in given and given["name"] != instance.name:
        await _name_free(uow.session, instance.workspace_id, given["name"], instance.id)
        instance.name = given["name"]
    reconnect = False
    if "base_url" in given and n8n.api_root(given["base_url"]) != instance.base_url:
        instance.base_url = n8n.api_root(given["base_url"])
        reconnect = True
    if data.api_key is not None:
        secrets = secrets_of(settings, instance)
        secrets.api_key = data.api_key.get_secret_value()
        seal(settings, instance, secrets)
        reconnect = True
    if reconnect:
        # Another address or key is another connection: test it again.
        instance.status, instance.status_reason = "unknown", "settings changed; test again"
        instance.capabilities, instance.n8n_version = {}, None
    if "environment" in given:
        instance.environment = given["environment"]
    if "tags" in given:
        instance.tags = list(dict.fromkeys(given["tags"]))
    if "enabled" in given:
        instance.enabled = given["enabled"]
    if data.notify is not None:
        instance.notify = data.notify.model_dump(mode="json")
    await uow.session.flush()
    fields = sorted(k for k in given if k != "api_key") + (["api_key"] if data.api_key else [])
    record(
        uow.session,
        access.principal,
        workspace_id=instance.workspace_id,
        action="n8n.instance.update",
        resource_type="n8n_instance",
        resource_id=instance.id,
        details={"fields": fields},
    )
    return instance


async def delete(uow: UnitOfWork, access: WorkspaceAccess) -> None:
    """Refused (409, naming them) while published workflows' `n8n` nodes call it, as for
    credentials and MCP servers: their runs would fail from then on."""
    instance: N8nInstance = access.resource
    users = await workflows_using(
        uow.session, instance.workspace_id, "instance_id", instance.id, published_only=True
    )
    if users:
        raise Conflict(
            f"published workflows call this n8n instance: {', '.join(users)}", workflows=users
        )
    # Its environment goes with it (the foreign key cascades): out of the pipelines too.
    env = await uow.session.scalar(
        select(N8nEnvironment).where(N8nEnvironment.instance_id == instance.id)
    )
    if env is not None:
        await environments.leave_pipelines(uow.session, access, env)
    record(
        uow.session,
        access.principal,
        workspace_id=instance.workspace_id,
        action="n8n.instance.delete",
        resource_type="n8n_instance",
        resource_id=instance.id,
        details={"name": instance.name},
    )
    await uow.session.delete(instance)
    await uow.session.flush()


def failed(instance: N8nInstance, exc: n8n.N8nFailure) -> None:
    """Leave a failed call's reason on the instance (its status for people to see)."""
    instance.status = exc.kind
    instance.status_reason = exc.message[:2000]
    instance.last_checked_at = datetime.now(UTC)


def upstream(exc: n8n.N8nFailure) -> UpstreamError:
    return UpstreamError(exc.message, n8n_status=exc.status, instance_status=exc.kind)


async def check(uow: UnitOfWork, settings: Settings, access: WorkspaceAccess) -> n8n.Probe | None:
    """Check URL and key; the instance row carries the outcome. None when it failed."""
    instance: N8nInstance = access.resource
    probe: n8n.Probe | None = None
    try:
        async with client_of(settings, instance) as api:
            probe = await api.probe()
    except n8n.N8nFailure as exc:
        failed(instance, exc)
    else:
        instance.status, instance.status_reason = "ok", None
        # 2.x keeps its exact version to signed-in sessions: then the generation.
        instance.n8n_version = probe.version or (f"{probe.major}.x" if probe.major else None)
        caps: dict[str, Any] = dict(probe.capabilities)
        if probe.major is not None:
            caps["legacy_publish"] = probe.major < 2
        instance.capabilities = caps
        instance.last_checked_at = datetime.now(UTC)
    await uow.session.flush()
    record(
        uow.session,
        access.principal,
        workspace_id=instance.workspace_id,
        action="n8n.instance.test",
        resource_type="n8n_instance",
        resource_id=instance.id,
        details={"status": instance.status, "version": instance.n8n_version},
    )
    return probe


# Quotas -----------------------------------------------------------------------------------


async def check_quota(
    session: AsyncSession, settings: Settings, access: WorkspaceAccess, name: str
) -> None:
    """Reserve one of today's toggles or refreshes (backend/quotas: the operator's
    limit, or the workspace's own lower one; counted from the activity log), or refuse
    with 402."""
    await quotas.admit_action(
        session,
        access.workspace.id,
        name,
        workspace_settings=access.workspace.settings,
        settings=settings,
    )


# Sync on demand ---------------------------------------------------------------------------


async def refresh(uow: UnitOfWork, settings: Settings, access: WorkspaceAccess) -> sync.Outcome:
    instance: N8nInstance = access.resource
    await check_quota(uow.session, settings, access, "n8n_refreshes_per_day")
    outcome = await sync.sync_instance(uow.session, settings, instance)
    record(
        uow.session,
        access.principal,
        workspace_id=instance.workspace_id,
        action="n8n.instance.refresh",
        resource_type="n8n_instance",
        resource_id=instance.id,
        details={"status": instance.status, "workflows": outcome.workflows,
                 "executions": outcome.executions},
    )  # fmt: skip
    return outcome


# Workflows and executions -----------------------------------------------------------------


def workflows_query(
    instance_id: uuid.UUID, *, active: bool | None, tag: str | None, q: str | None
) -> Select[N8nWorkflow]:
    stmt = select(N8nWorkflow).where(N8nWorkflow.instance_id == instance_id)
    if active is not None:
        stmt = stmt.where(N8nWorkflow.active.is_(active))
    if tag:
        stmt = stmt.where(N8nWorkflow.tags.contains([tag]))
    if q:
        escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        stmt = stmt.where(N8nWorkflow.name.ilike(f"%{escaped}%", escape="\\"))
    return stmt.order_by(N8nWorkflow.name, N8nWorkflow.n8n_id)


async def workflow_by_n8n_id(
    session: AsyncSession, instance_id: uuid.UUID, n8n_id: str
) -> N8nWorkflow:
    row = await session.scalar(
        select(N8nWorkflow).where(
            N8nWorkflow.instance_id == instance_id, N8nWorkflow.n8n_id == n8n_id
        )
    )
    if row is None:
        raise NotFound("n8n workflow not found (refresh the instance if it is new)")
    return row


def executions_query(
    instance_id: uuid.UUID, *, status: str | None, workflow_n8n_id: str | None
) -> Select[N8nExecution]:
    stmt = select(N8nExecution).where(N8nExecution.instance_id == instance_id)
    if status:
        stmt = stmt.where(N8nExecution.status == status)
    if workflow_n8n_id:
        stmt = stmt.where(N8nExecution.workflow_n8n_id == workflow_n8n_id)
    return stmt.order_by(N8nExecution.started_at.desc().nulls_last(), N8nExecution.n8n_id.desc())


def errors_query(instance_id: uuid.UUID) -> Select[N8nError]:
    return (
        select(N8nError)
        .where(N8nError.instance_id == instance_id)
        .order_by(N8nError.created_at.desc(), N8nError.id.desc())
    )


async def toggle(
    uow: UnitOfWork, settings: Settings, access: WorkspaceAccess, n8n_id: str, active: bool
) -> N8nWorkflow:
    """Switch a workflow on or off on its instance (2.x publish/unpublish, 1.x
    activate/deactivate), and keep our copy in step with n8n's answer."""
    instance: N8nInstance = access.resource
    row = await workflow_by_n8n_id(uow.session, instance.id, n8n_id)
    await check_quota(uow.session, settings, access, "n8n_toggles_per_day")
    api = client_of(settings, instance)
    try:
        async with api:
            answer = await (api.publish(n8n_id) if active else api.unpublish(n8n_id))
            # publish answers the workflow; read it back when an older n8n did not.
            if not isinstance(answer.get("active"), bool):
                answer = await api.workflow(n8n_id)
    except n8n.N8nFailure as exc:
        if exc.kind in ("unreachable", "unauthorized"):
            failed(instance, exc)
            await uow.session.flush()
        raise upstream(exc) from exc
    if api.legacy_publish is not None:
        instance.capabilities = {**instance.capabilities, "legacy_publish": api.legacy_publish}
    before = row.active
    sync.apply_workflow(row, answer)
    row.active = bool(answer.get("active", active))
    await uow.session.flush()
    record(
        uow.session,
        access.principal,
        workspace_id=instance.workspace_id,
        action="n8n.workflow.toggle",
        resource_type="n8n_workflow",
        resource_id=row.id,
        details={"instance_id": str(instance.id), "n8n_id": n8n_id, "name": row.name,
                 "from": before, "to": row.active},
    )  # fmt: skip
    return row


async def retry(
    uow: UnitOfWork,
    settings: Settings,
    access: WorkspaceAccess,
    execution_n8n_id: str,
    *,
    load_workflow: bool,
) -> N8nExecution:
    instance: N8nInstance = access.resource
    original = await uow.session.scalar(
        select(N8nExecution).where(
            N8nExecution.instance_id == instance.id, N8nExecution.n8n_id == execution_n8n_id
        )
    )
    if original is None:
        raise NotFound("n8n execution not found (refresh the instance if it is new)")
    try:
        async with client_of(settings, instance) as api:
            answer = await api.retry_execution(execution_n8n_id, load_workflow=load_workflow)
    except n8n.N8nFailure as exc:
        if exc.kind in ("unreachable", "unauthorized"):
            failed(instance, exc)
            await uow.session.flush()
        raise upstream(exc) from exc
    new_id = str(answer.get("id") or "")
    if not new_id:
        raise UpstreamError("n8n accepted the retry but named no new execution")
    answer.setdefault("retryOf", execution_n8n_id)
    answer.setdefault("workflowId", original.workflow_n8n_id or "")
    rows = await sync.upsert_executions(uow.session, instance, [answer], {})
    record(
        uow.session,
        access.principal,
        workspace_id=instance.workspace_id,
        action="n8n.execution.retry",
        resource_type="n8n_execution",
        resource_id=original.id,
        details={"instance_id": str(instance.id), "n8n_id": execution_n8n_id,
                 "new_n8n_id": new_id, "load_workflow": load_workflow},
    )  # fmt: skip
    return rows[0]


# The error workflow -----------------------------------------------------------------------


def error_workflow_body(url: str) -> WorkflowCreate:
    """Error Trigger -> HTTP Request posting the trigger's JSON to our intake."""
    trigger: Node = {
        "id": "5d1f6c8e-0b6a-4a53-9f3e-3c2b8f1a0001",
        "name": "Error Trigger",
        "type": "n8n-nodes-base.errorTrigger",
        "typeVersion": 1,
        "position": [0, 0],
        "parameters": {},
    }
    post: Node = {
        "id": "5d1f6c8e-0b6a-4a53-9f3e-3c2b8f1a0002",
        "name": "Report to Orchestration Studio",
        "type": "n8n-nodes-base.httpRequest",
        "typeVersion": 4.2,
        "position": [260, 0],
        "parameters": {
            "method": "POST",
            "url": url,
            "sendBody": True,
            "specifyBody": "json",
            "jsonBody": "={{ JSON.stringify($json) }}",
            "options": {"timeout": 10000},
        },
    }
    return {
        "name": ERROR_WORKFLOW_NAME,
        "nodes": [trigger, post],
        "connections": {
            "Error Trigger": {
                "main": [[{"node": "Report to Orchestration Studio", "type": "main", "index": 0}]]
            }
        },
        "settings": {"executionOrder": "v1"},
    }


def _writable(workflow: Workflow, error_workflow_id: str) -> WorkflowCreate:
    """What PUT /workflows/{id} takes back: the four writable keys, with the error
    workflow set (the spec refuses read-only keys)."""
    settings = dict(workflow.get("settings") or {})
    settings["errorWorkflow"] = error_workflow_id
    return {
        "name": workflow.get("name", ""),
        "nodes": list(workflow.get("nodes") or []),
        "connections": dict(workflow.get("connections") or {}),
        "settings": settings,
    }


async def install_error_workflow(
    uow: UnitOfWork,
    settings: Settings,
    access: WorkspaceAccess,
    data: InstallErrorWorkflow,
    request_base: str,
) -> dict[str, Any]:
    instance: N8nInstance = access.resource
    base = data.intake_base_url or settings.n8n.intake_base_url or request_base
    url = intake_url(settings, instance, base)
    body = error_workflow_body(url)
    targets = list(dict.fromkeys(data.workflow_ids))
    if data.all_workflows:
        synced = await uow.session.scalars(
            select(N8nWorkflow.n8n_id).where(
                N8nWorkflow.instance_id == instance.id, N8nWorkflow.archived.is_(False)
            )
        )
        targets += [i for i in synced.all() if i not in targets]
    created = False
    linked: list[str] = []
    problems: dict[str, str] = {}
    api = client_of(settings, instance)
    try:
        async with api:
            workflow: Workflow | None = None
            if instance.error_workflow_id:
                try:
                    workflow = await api.update_workflow(instance.error_workflow_id, body)
                except n8n.Missing:
                    workflow = None  # deleted on the instance: make it again
            if workflow is None:
                workflow = await api.create_workflow(body)
                created = True
            error_id = str(workflow.get("id") or "")
            if not error_id:
                raise n8n.N8nFailure("n8n created the error workflow but named no id")
            # In 2.x an unpublished error workflow is silently skipped: publish it.
            published = await api.publish(error_id)
            for wid in targets:
                if wid == error_id:
                    continue
                try:
                    current = await api.workflow(wid)
                    await api.update_workflow(wid, _writable(current, error_id))
                    linked.append(wid)
                except n8n.N8nFailure as exc:
                    if exc.kind in ("unreachable", "unauthorized"):
                        raise
                    problems[wid] = exc.message
    except n8n.N8nFailure as exc:
        if exc.kind in ("unreachable", "unauthorized"):
            failed(instance, exc)
            await uow.session.flush()
        raise upstream(exc) from exc
    if api.legacy_publish is not None:
        instance.capabilities = {**instance.capabilities, "legacy_publish": api.legacy_publish}
    instance.error_workflow_id = error_id
    if linked:
        await uow.session.execute(
            sql_update(N8nWorkflow)
            .where(N8nWorkflow.instance_id == instance.id, N8nWorkflow.n8n_id.in_(linked))
            .values(error_workflow=error_id)
        )
    await uow.session.flush()
    record(
        uow.session,
        access.principal,
        workspace_id=instance.workspace_id,
        action="n8n.instance.install_error_workflow",
        resource_type="n8n_instance",
        resource_id=instance.id,
        details={"error_workflow_id": error_id, "created": created, "linked": linked,
                 "failed": sorted(problems)},
    )  # fmt: skip
    return {
        "error_workflow_id": error_id,
        "created": created,
        "active": bool(published.get("active", True)),
        "intake_url": url,
        "linked": linked,
        "failed": problems,
    }


# Watches ----------------------------------------------------------------------------------


async def watch(uow: UnitOfWork, access: WorkspaceAccess, workflow_n8n_id: str | None) -> N8nWatch:
    instance: N8nInstance = access.resource
    key = workflow_n8n_id or ""
    if key:
        await workflow_by_n8n_id(uow.session, instance.id, key)
    existing = await uow.session.scalar(
        select(N8nWatch).where(
            N8nWatch.instance_id == instance.id,
            N8nWatch.user_id == access.user.id,
            N8nWatch.workflow_n8n_id == key,
        )
    )
    if existing is not None:
        return existing
    row = N8nWatch(
        workspace_id=instance.workspace_id,
        instance_id=instance.id,
        user_id=access.user.id,
        workflow_n8n_id=key,
    )
    uow.session.add(row)
    await uow.session.flush()
    record(
        uow.session,
        access.principal,
        workspace_id=instance.workspace_id,
        action="n8n.watch.create",
        resource_type="n8n_instance",
        resource_id=instance.id,
        details={"workflow_n8n_id": key or None},
    )
    return row


async def watches_of(
    session: AsyncSession, instance_id: uuid.UUID, user_id: uuid.UUID
) -> Sequence[N8nWatch]:
    rows = await session.scalars(
        select(N8nWatch)
        .where(N8nWatch.instance_id == instance_id, N8nWatch.user_id == user_id)
        .order_by(N8nWatch.created_at)
    )
    return rows.all()


async def unwatch(uow: UnitOfWork, access: WorkspaceAccess, watch_id: uuid.UUID) -> None:
    instance: N8nInstance = access.resource
    row = await uow.session.get(N8nWatch, watch_id)
    if row is None or row.instance_id != instance.id or row.user_id != access.user.id:
        raise NotFound("watch not found")
    await uow.session.delete(row)
    await uow.session.flush()
    record(
        uow.session,
        access.principal,
        workspace_id=instance.workspace_id,
        action="n8n.watch.delete",
        resource_type="n8n_instance",
        resource_id=instance.id,
        details={"workflow_n8n_id": row.workflow_n8n_id or None},
    )


def notify_of(instance: N8nInstance) -> Notify:
    """Who to tell, from the stored row. An entry today's rules refuse (stored before a
    rule was added) is dropped alone: the rest of the instance's people still hear."""
    stored = instance.notify if isinstance(instance.notify, dict) else {}
    try:
        return Notify.model_validate(stored)
    except ValueError:
        pass
    kept: dict[str, list[str]] = {"emails": [], "webhooks": []}
    for name in kept:
        for entry in stored.get(name) or []:
            try:
                Notify.model_validate({name: [entry]})
            except ValueError:
                log.warning("n8n.notify_entry_dropped", instance_id=str(instance.id), kind=name)
                continue
            kept[name].append(entry)
    return Notify.model_validate(kept)
