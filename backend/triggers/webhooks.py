"""Incoming webhooks: `POST /api/v1/hooks/{token}` starts a run of the trigger's
workflow with the request body as `trigger_data`.

No user signs in: the token (random, one per trigger) is the address. With
`verify_signature`, the request must also carry a Standard Webhooks signature made with
the trigger's secret, stamped within the tolerance, and with a `webhook-id` not seen
before (remembered in Redis for twice the tolerance, so a captured request cannot be
replayed inside the window either).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import anyio
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.executions import service as executions
from backend.executions.state import TERMINAL_EXECUTION
from backend.kit import bodies, signing
from backend.kit.db import UnitOfWork
from backend.kit.errors import Conflict, NotFound, Unauthenticated, ValidationFailed
from backend.models import Trigger, Workflow, WorkflowExecution
from backend.triggers.service import open_secret
from backend.workflows.graph import WebhookTrigger


@dataclass
class Received:
    execution_id: uuid.UUID
    # Set when the caller waited and the run ended in time.
    finished: WorkflowExecution | None = None


def parse_body(content_type: str, body: bytes) -> dict[str, Any]:
    """JSON objects as they are (other JSON values under "body"), form fields as a dict
    (repeated fields as lists), an empty body as {}. JSON is held to the API's input
    rules (finite numbers, no NUL, bounded depth), like every other body."""
    if not body.strip():
        return {}
    media = content_type.split(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        try:
            value = bodies.loads(body)
        except ValueError as exc:
            raise ValidationFailed("the body is not valid JSON", field="body") from exc
        return value if isinstance(value, dict) else {"body": value}
    if media == "application/x-www-form-urlencoded":
        fields: dict[str, Any] = {}
        bodies.check_form(body)
        for key, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
            if key in fields:
                existing = fields[key]
                fields[key] = (
                    [*existing, value] if isinstance(existing, list) else [existing, value]
                )
            else:
                fields[key] = value
        return fields
    raise ValidationFailed(
        "send application/json or application/x-www-form-urlencoded", field="content-type"
    )


async def _check_signature(
    redis: Redis, settings: Settings, trigger: Trigger, headers: dict[str, str], body: bytes
) -> str:
    if not trigger.secret_encrypted:
        raise Unauthenticated(
            "this webhook requires signatures but has no secret yet; "
            "create one with POST .../triggers/{trigger_id}/secret"
        )
    secret = open_secret(settings, trigger.id, trigger.secret_encrypted)
    try:
        message_id = signing.verify(secret, headers, body)
    except signing.SignatureError as exc:
        raise Unauthenticated(f"invalid webhook signature: {exc}") from None
    key = f"hooks:seen:{trigger.id}:{message_id}"
    if not await redis.set(key, b"1", nx=True, ex=2 * signing.TOLERANCE_S):
        raise Conflict("this webhook-id was already delivered", field="webhook-id")
    return key


async def receive(
    sessionmaker: async_sessionmaker[AsyncSession],
    redis: Redis,
    settings: Settings,
    *,
    token: str,
    headers: dict[str, str],
    body: bytes,
    wait_s: float | None,
) -> Received:
    seen_key: str | None = None
    try:
        async with UnitOfWork(sessionmaker) as uow:
            row = (
                await uow.session.execute(
                    select(Trigger, Workflow)
                    .join(Workflow, Workflow.id == Trigger.workflow_id)
                    .where(Trigger.token == token, Trigger.kind == "webhook")
                )
            ).first()
            # Unknown, disabled and unpublished all look the same from outside.
            if row is None or not (row[0].enabled and row[0].active):
                raise NotFound("no active webhook at this address")
            trigger, workflow = row
            config = WebhookTrigger.model_validate(trigger.config)
            if config.verify_signature:
                seen_key = await _check_signature(redis, settings, trigger, headers, body)
            data = parse_body(headers.get("content-type", ""), body)
            execution_id = await executions.start_unattended(
                uow, workflow, trigger_type="webhook", trigger_data=data, trigger_id=trigger.id
            )
            assert execution_id is not None
    except Exception:
        # The delivery did not happen: the sender's retry (same webhook-id) must work.
        if seen_key is not None:
            await redis.delete(seen_key)
        raise
    if wait_s is None and config.respond == "when_finished":
        wait_s = settings.triggers.webhook_max_wait_s
    received = Received(execution_id)
    if wait_s:
        received.finished = await _wait(
            sessionmaker, execution_id, min(wait_s, settings.triggers.webhook_max_wait_s)
        )
    return received


async def _wait(
    sessionmaker: async_sessionmaker[AsyncSession], execution_id: uuid.UUID, wait_s: float
) -> WorkflowExecution | None:
    """The run once it ended, or None if it is still going after `wait_s`. Polls the
    row, starting fast (most webhook flows are short) and backing off to 0.5 s."""
    deadline = time.monotonic() + wait_s
    pause = 0.02
    while True:
        async with sessionmaker() as session:
            execution = await session.get(WorkflowExecution, execution_id)
            if execution is not None and execution.status in TERMINAL_EXECUTION:
                return execution
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        await anyio.sleep(min(pause, left))
        pause = min(pause * 2, 0.5)
