"""Failures reported by an instance's error workflow: `POST /api/v1/hooks/n8n/{token}`.

No one signs in: the token (random, one per instance, stored hashed) is the address. The
body is what n8n's Error Trigger emits: `{execution: {id, url, error: {message, node},
lastNodeExecuted, mode, retryOf}, workflow: {id, name}}`, or `{trigger: {error, mode},
workflow}` when the trigger itself failed. One row per execution (a second report of the
same execution counts `reports` and tells nobody again); the synced execution, if we hold
it, gets the error too. The people who watch the instance or the workflow hear of it
through their notifications (kind `n8n.error`: inbox, live, e-mail, Web Push and FCM, as
their preferences say), and so do the instance's own notify e-mails and webhooks (signed).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from backend.config import Settings
from backend.kit.crypto import hash_token
from backend.kit.db import UnitOfWork
from backend.kit.errors import NotFound, ValidationFailed
from backend.kit.logging import get_logger
from backend.kit.mail import send_mail
from backend.kit.tasks import enqueue_after_commit
from backend.models import (
    N8nError,
    N8nExecution,
    N8nInstance,
    N8nWatch,
    N8nWorkflow,
    User,
    WorkspaceMember,
)
from backend.n8n.service import notify_of
from backend.push import service as push

log = get_logger(__name__)
KIND = "n8n.error"
WEBHOOK_TASK = "n8n.deliver_webhook"
MAX_PEOPLE = 200


@dataclass
class Report:
    execution_id: str | None
    workflow_id: str | None
    workflow_name: str | None
    node: str | None
    message: str
    url: str | None
    mode: str | None
    retry_of: str | None


def _s(value: Any, limit: int) -> str | None:
    if value is None or isinstance(value, dict | list):
        return None
    text = str(value).strip()
    return text[:limit] if text else None


def parse(payload: Any) -> Report:
    """Read the Error Trigger's JSON; refuse what is not one (422, field named)."""
    if isinstance(payload, list) and len(payload) == 1:
        payload = payload[0]  # an HTTP node set to send all items as one array
    if not isinstance(payload, dict):
        raise ValidationFailed("the body must be the Error Trigger's JSON object", field="body")
    workflow = payload.get("workflow")
    execution = payload.get("execution")
    trigger = payload.get("trigger")
    if not isinstance(workflow, dict):
        raise ValidationFailed("`workflow` must be an object with id and name", field="workflow")
    if not isinstance(execution, dict) and not isinstance(trigger, dict):
        raise ValidationFailed(
            "the body names neither an `execution` nor a failed `trigger`", field="execution"
        )
    source = execution if isinstance(execution, dict) else trigger
    assert isinstance(source, dict)
    error = source.get("error")
    error = error if isinstance(error, dict) else {"message": error}
    node = error.get("node")
    node_name = node.get("name") if isinstance(node, dict) else node
    message = _s(error.get("message") or error.get("description"), 4000) or "(no message)"
    return Report(
        execution_id=_s(execution.get("id"), 64) if isinstance(execution, dict) else None,
        workflow_id=_s(workflow.get("id"), 64),
        workflow_name=_s(workflow.get("name"), 500),
        node=_s(node_name, 500)
        or (_s(execution.get("lastNodeExecuted"), 500) if isinstance(execution, dict) else None),
        message=message,
        url=_s(execution.get("url"), 2000) if isinstance(execution, dict) else None,
        mode=_s(source.get("mode"), 30),
        retry_of=_s(execution.get("retryOf"), 64) if isinstance(execution, dict) else None,
    )


def dedupe_key(report: Report) -> str:
    if report.execution_id:
        return f"execution:{report.execution_id}"
    digest = hashlib.sha256(report.message.encode()).hexdigest()[:32]
    return f"trigger:{report.workflow_id or '-'}:{digest}"


async def instance_for(session: AsyncSession, token: str) -> N8nInstance:
    instance = await session.scalar(
        select(N8nInstance).where(N8nInstance.intake_token_hash == hash_token(token))
    )
    if instance is None:
        raise NotFound("unknown intake address")
    return instance


async def receive(
    uow: UnitOfWork, settings: Settings, token: str, payload: Any
) -> tuple[N8nError, bool]:
    """Record one report; (the error row, whether it is new). New ones are told."""
    session = uow.session
    instance = await instance_for(session, token)
    report = parse(payload)
    workflow = None
    if report.workflow_id:
        workflow = await session.scalar(
            select(N8nWorkflow).where(
                N8nWorkflow.instance_id == instance.id, N8nWorkflow.n8n_id == report.workflow_id
            )
        )
    key = dedupe_key(report)
    inserted = await session.scalar(
        pg_insert(N8nError)
        .values(
            id=uuid.uuid4(),
            workspace_id=instance.workspace_id,
            instance_id=instance.id,
            dedupe_key=key,
            execution_n8n_id=report.execution_id,
            workflow_n8n_id=report.workflow_id,
            workflow_id=workflow.id if workflow else None,
            workflow_name=report.workflow_name or (workflow.name if workflow else None),
            node=report.node,
            message=report.message,
            url=report.url,
            mode=report.mode,
            notified={},
        )
        .on_conflict_do_nothing(index_elements=["instance_id", "dedupe_key"])
        .returning(N8nError.id)
    )
    if inserted is None:
        await session.execute(
            update(N8nError)
            .where(N8nError.instance_id == instance.id, N8nError.dedupe_key == key)
            .values(reports=N8nError.reports + 1, updated_at=func.now())
        )
        row = await session.scalar(
            select(N8nError)
            .where(N8nError.instance_id == instance.id, N8nError.dedupe_key == key)
            .execution_options(populate_existing=True)
        )
        assert row is not None
        return row, False
    row = await session.get(N8nError, inserted)
    assert row is not None
    if report.execution_id:
        await _mark_execution(session, instance, workflow, report)
    row.notified = await _tell(uow, settings, instance, row)
    await session.flush()
    log.info("n8n.error_received", instance_id=str(instance.id), execution=report.execution_id,
             workflow=report.workflow_id, notified=row.notified)  # fmt: skip
    return row, True


async def _mark_execution(
    session: AsyncSession, instance: N8nInstance, workflow: N8nWorkflow | None, report: Report
) -> None:
    """The execution as failed in our copy now, before the next sync reads it."""
    assert report.execution_id
    await session.execute(
        pg_insert(N8nExecution)
        .values(
            id=uuid.uuid4(),
            workspace_id=instance.workspace_id,
            instance_id=instance.id,
            n8n_id=report.execution_id,
            workflow_n8n_id=report.workflow_id,
            workflow_id=workflow.id if workflow else None,
            status="error",
            mode=report.mode,
            finished=False,
            retry_of=report.retry_of,
            error_message=report.message,
            failed_node=report.node,
        )
        .on_conflict_do_update(
            index_elements=["instance_id", "n8n_id"],
            set_={
                "status": "error",
                "error_message": report.message,
                "failed_node": report.node,
                "updated_at": func.now(),
            },
        )
    )


async def watchers(
    session: AsyncSession, instance: N8nInstance, workflow_n8n_id: str | None
) -> list[uuid.UUID]:
    """Who watches the instance (all workflows) or this workflow, and is still an active
    member of the workspace."""
    rows = await session.scalars(
        select(N8nWatch.user_id)
        .join(
            WorkspaceMember,
            (WorkspaceMember.user_id == N8nWatch.user_id)
            & (WorkspaceMember.workspace_id == instance.workspace_id),
        )
        .join(User, (User.id == N8nWatch.user_id) & User.is_active.is_(True))
        .where(
            N8nWatch.instance_id == instance.id,
            or_(
                N8nWatch.workflow_n8n_id == "", N8nWatch.workflow_n8n_id == (workflow_n8n_id or "")
            ),
        )
        .distinct()
        .limit(MAX_PEOPLE)
    )
    return list(rows.all())


def describe(instance: N8nInstance, error: N8nError) -> tuple[str, str]:
    name = error.workflow_name or error.workflow_n8n_id or "a workflow"
    title = f"n8n: {name} failed on {instance.name}"
    lines = [
        f"Instance: {instance.name} ({instance.environment}, {instance.base_url})",
        f"Workflow: {name}" + (f" (id {error.workflow_n8n_id})" if error.workflow_n8n_id else ""),
    ]
    if error.execution_n8n_id:
        lines.append(f"Execution: {error.execution_n8n_id}")
    if error.node:
        lines.append(f"Node: {error.node}")
    lines.append(f"Error: {error.message}")
    if error.url:
        lines.append(f"Open in n8n: {error.url}")
    return title, "\n".join(lines)


async def _tell(
    uow: UnitOfWork, settings: Settings, instance: N8nInstance, error: N8nError
) -> dict[str, Any]:
    """The watchers through the people's notifications (backend/push: inbox row, live on
    their channel, e-mail and Web Push/FCM, each as their preferences for `n8n.error`
    say), then the instance's own notify e-mails (those not already written to) and
    webhooks. What was done, for the error row's `notified`."""
    session = uow.session
    title, body = describe(instance, error)
    data = {
        "instance_id": str(instance.id),
        "error_id": str(error.id),
        "workflow_n8n_id": error.workflow_n8n_id,
        "execution_n8n_id": error.execution_n8n_id,
        "url": error.url,
    }
    people = await watchers(session, instance, error.workflow_n8n_id)
    told = await push.notify(
        uow,
        settings,
        people,
        kind=KIND,
        title=title,
        body=body,
        data=data,
        workspace_id=instance.workspace_id,
        email=lambda _user: (title, body),
    )
    emails: list[str] = []
    if people:
        prefs = await push.preferences_of(session, people)
        users = await session.scalars(
            select(User).where(User.id.in_(people), User.is_active.is_(True))
        )
        emails = [u.email for u in users if push.wants(prefs.get(u.id, {}), KIND, "email")]
    notify = notify_of(instance)
    for address in dict.fromkeys(notify.emails):
        if address not in emails:
            send_mail(uow, settings, to=address, subject=title, body=body)
    for url in notify.webhooks:
        enqueue_after_commit(uow, WEBHOOK_TASK, str(error.id), url)
    return {"users": [str(u) for u in told],
            "emails": sorted(set(emails) | set(notify.emails)),
            "webhooks": list(notify.webhooks)}  # fmt: skip


def webhook_payload(instance: N8nInstance, error: N8nError) -> dict[str, Any]:
    return {
        "type": KIND,
        "instance": {"id": str(instance.id), "name": instance.name,
                     "environment": instance.environment, "base_url": instance.base_url},
        "workflow": {"id": error.workflow_n8n_id, "name": error.workflow_name},
        "execution": {"id": error.execution_n8n_id, "url": error.url, "mode": error.mode},
        "node": error.node,
        "message": error.message,
        "error_id": str(error.id),
        "received_at": error.created_at.isoformat(),
    }  # fmt: skip
