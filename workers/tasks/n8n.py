"""n8n fleet tasks: `n8n.sync_due` (beat's pass: one `n8n.sync_instance` per instance
whose sync is due), `n8n.sync_instance` (claim, read n8n with no transaction open, apply
in one), and `n8n.deliver_webhook` (one signed POST about a reported failure, retried
with backoff on 408/429/5xx and connection errors)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
from celery import Task

from backend.config import get_settings
from backend.kit import signing
from backend.kit.celery_app import celery_app
from backend.kit.db import UnitOfWork
from backend.kit.logging import get_logger
from backend.kit.tasks import Send, send_in_thread
from backend.models import N8nError, N8nInstance
from backend.n8n import sync
from backend.n8n.intake import webhook_payload
from backend.n8n.service import secrets_of
from workers.tasks.executions import process

log = get_logger(__name__)
SYNC_INSTANCE = "n8n.sync_instance"


@celery_app.task(name="n8n.sync_due")
def sync_due() -> dict[str, int]:
    """Send a sync for every enabled instance whose last sync is older than
    N8N__SYNC_INTERVAL_S. A second beat (or a tick while the last sync still runs) sends
    duplicates that find the instance claimed or freshly synced, and do nothing."""
    p = process()
    settings = get_settings()

    async def run() -> int:
        async with p.sessionmaker() as session:
            ids = await sync.due(session, settings)
        if ids:
            await send_in_thread(*(Send(SYNC_INSTANCE, (str(i),)) for i in ids))
        return len(ids)

    sent = p.run(run())
    if sent:
        log.info("n8n.sync_sent", instances=sent)
    return {"sent": sent}


async def _sync(instance_id: uuid.UUID) -> dict[str, Any]:
    p = process()
    settings = get_settings()
    async with UnitOfWork(p.sessionmaker) as uow:
        if not await sync.claim(uow.session, settings, instance_id):
            return {"skipped": "claimed"}
        instance = await uow.session.get(N8nInstance, instance_id)
        if instance is None:
            return {"skipped": "gone"}
        snap = await sync.snapshot(uow.session, settings, instance)
    # n8n is read with no transaction open: a slow instance holds no connection.
    fetched = await sync.fetch(settings, snap)
    async with UnitOfWork(p.sessionmaker) as uow:
        instance = await uow.session.get(N8nInstance, instance_id)
        if instance is None:
            return {"skipped": "deleted while syncing"}
        outcome = await sync.apply(uow.session, instance, snap, fetched)
    if not outcome.ok:
        log.warning("n8n.sync_failed", instance_id=str(instance_id), status=outcome.status,
                    reason=outcome.reason)  # fmt: skip
    return {"ok": outcome.ok, "status": outcome.status, "workflows": outcome.workflows,
            "executions": outcome.executions}  # fmt: skip


@celery_app.task(name=SYNC_INSTANCE)
def sync_instance(instance_id: str) -> dict[str, Any]:
    return process().run(_sync(uuid.UUID(instance_id)))


class PermanentFailure(Exception):
    """A receiver's answer that a retry will not change (a 4xx other than 408/429)."""


async def _deliver(error_id: uuid.UUID, url: str) -> str:
    p = process()
    settings = get_settings()
    async with p.sessionmaker() as session:
        error = await session.get(N8nError, error_id)
        instance = await session.get(N8nInstance, error.instance_id) if error else None
        if error is None or instance is None:
            return "gone"
        if url not in (instance.notify or {}).get("webhooks", []):
            return "no longer a target"
        payload = webhook_payload(instance, error)
        secret = secrets_of(settings, instance).webhook_secret
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = {"content-type": "application/json"}
    headers.update(signing.sign(secret, body, message_id=f"msg_{error_id.hex}"))
    response = await p.http.post(
        url, content=body, headers=headers, timeout=settings.notifications.timeout_s
    )
    if response.status_code >= 300:
        message = f"HTTP {response.status_code} from {url}"
        if response.status_code in (408, 429) or response.status_code >= 500:
            raise ConnectionError(message)
        raise PermanentFailure(message)
    return "sent"


@celery_app.task(
    name="n8n.deliver_webhook",
    bind=True,
    autoretry_for=(ConnectionError, httpx.TransportError),
    retry_backoff=5,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=5,
)
def deliver_webhook(self: Task[Any, Any], error_id: str, url: str) -> str:
    try:
        return process().run(_deliver(uuid.UUID(error_id), url))
    except PermanentFailure as exc:
        log.warning("n8n.webhook_refused", error_id=error_id, reason=str(exc))
        return "refused"
