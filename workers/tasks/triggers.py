"""Trigger and notification tasks: `triggers.dispatch_due` (beat's schedule tick) and
`notifications.deliver` (one notification of a run's end, email or signed webhook,
retried with backoff and recorded on its row)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from celery import Task
from sqlalchemy import select

from backend.config import Settings, get_settings
from backend.kit import signing
from backend.kit.celery_app import celery_app
from backend.kit.db import UnitOfWork
from backend.kit.logging import get_logger
from backend.models import Notification, NotificationSecret, Workflow, WorkflowExecution
from backend.triggers.service import dispatch_due as dispatch_pass
from backend.triggers.service import open_secret
from workers.tasks.executions import process
from workers.tasks.notifications import deliver as deliver_mail

log = get_logger(__name__)


@celery_app.task(name="triggers.dispatch_due")
def dispatch_due() -> dict[str, int]:
    """Fire every schedule slot that is due. Passes repeat while a full batch came back,
    so a backlog drains in one tick; each pass is its own transaction."""
    p = process()
    settings = get_settings()

    async def run() -> int:
        started = 0
        while True:
            async with UnitOfWork(p.sessionmaker) as uow:
                ids = await dispatch_pass(uow, settings, datetime.now(UTC))
            started += len(ids)
            if len(ids) < settings.triggers.dispatch_batch:
                return started

    started = p.run(run())
    if started:
        log.info("triggers.dispatched", runs=started)
    return {"started": started}


# Notifications ----------------------------------------------------------------------------


class PermanentFailure(Exception):
    """A delivery that retrying will not fix (a 4xx answer, say)."""


@dataclass
class Delivery:
    id: uuid.UUID
    channel: str
    target: str
    event: str
    attempts: int
    payload: dict[str, Any]
    workflow_name: str
    secret: str | None


async def _load(settings: Settings, notification_id: uuid.UUID) -> Delivery | None:
    async with process().sessionmaker() as session:
        row = await session.get(Notification, notification_id)
        if row is None or row.status in ("sent", "failed"):
            return None
        execution = await session.get(WorkflowExecution, row.execution_id)
        workflow = await session.get(Workflow, row.workflow_id)
        if execution is None or workflow is None:
            return None
        sealed = await session.scalar(
            select(NotificationSecret.secret_encrypted).where(
                NotificationSecret.workflow_id == workflow.id
            )
        )
        payload = {
            "type": f"execution.{row.event}",
            "workflow": {"id": str(workflow.id), "name": workflow.name},
            "execution": {
                "id": str(execution.id),
                "status": execution.status,
                "trigger_type": execution.trigger_type,
                "error": execution.error,
                "started_at": execution.started_at.isoformat() if execution.started_at else None,
                "finished_at": execution.finished_at.isoformat() if execution.finished_at else None,
            },
        }
        return Delivery(
            id=row.id,
            channel=row.channel,
            target=row.target,
            event=row.event,
            attempts=row.attempts,
            payload=payload,
            workflow_name=workflow.name,
            secret=open_secret(settings, workflow.id, sealed) if sealed else None,
        )


async def _post(settings: Settings, delivery: Delivery) -> None:
    body = json.dumps(delivery.payload, separators=(",", ":")).encode()
    headers = {"content-type": "application/json"}
    if delivery.secret:
        headers.update(signing.sign(delivery.secret, body, message_id=f"msg_{delivery.id.hex}"))
    response = await process().http.post(
        delivery.target, content=body, headers=headers, timeout=settings.notifications.timeout_s
    )
    if response.status_code >= 300:
        message = f"HTTP {response.status_code} from the receiver"
        # 408/429 and 5xx may pass later; any other answer will be the same next time.
        if response.status_code in (408, 429) or response.status_code >= 500:
            raise httpx.HTTPStatusError(message, request=response.request, response=response)
        raise PermanentFailure(message)


def _mail(settings: Settings, delivery: Delivery) -> None:
    execution = delivery.payload["execution"]
    subject = f"[{delivery.workflow_name}] run {execution['status']}"
    error = (execution.get("error") or {}).get("message") if execution.get("error") else None
    lines = [
        f"Workflow: {delivery.workflow_name}",
        f"Run: {execution['id']} ({execution['status']}, {execution['trigger_type']} trigger)",
        f"Finished: {execution['finished_at']}",
    ]
    if error:
        lines.append(f"Error: {error}")
    deliver_mail(settings, delivery.target, subject, "\n".join(lines))


async def _record(notification_id: uuid.UUID, *, error: str | None, final: bool) -> int:
    async with UnitOfWork(process().sessionmaker) as uow:
        row = await uow.session.get(Notification, notification_id, with_for_update=True)
        if row is None:
            return 0
        row.attempts += 1
        if error is None:
            row.status, row.sent_at, row.last_error = "sent", datetime.now(UTC), None
        else:
            row.status = "failed" if final else "retrying"
            row.last_error = error[:2000]
        return row.attempts


@celery_app.task(name="notifications.deliver", bind=True, max_retries=None)
def deliver(self: Task, notification_id: str) -> str:  # type: ignore[type-arg]
    settings = get_settings()
    p = process()
    nid = uuid.UUID(notification_id)
    delivery = p.run(_load(settings, nid))
    if delivery is None:
        return "nothing to do"
    try:
        if delivery.channel == "email":
            _mail(settings, delivery)
        else:
            p.run(_post(settings, delivery))
    except Exception as exc:
        permanent = isinstance(exc, PermanentFailure)
        final = permanent or delivery.attempts + 1 > settings.notifications.max_retries
        attempts = p.run(_record(nid, error=f"{type(exc).__name__}: {exc}", final=final))
        log.warning(
            "notification.failed",
            notification_id=notification_id,
            channel=delivery.channel,
            attempts=attempts,
            final=final,
            error=type(exc).__name__,
        )
        if final:
            return "failed"
        n = settings.notifications
        countdown = min(
            n.backoff_s * 2 ** (attempts - 1), n.backoff_max_s, settings.celery.max_countdown_s
        )
        raise self.retry(countdown=countdown) from None
    p.run(_record(nid, error=None, final=True))
    log.info("notification.sent", notification_id=notification_id, channel=delivery.channel)
    return "sent"
