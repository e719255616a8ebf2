"""Trigger records: kept in step with the workflow's current version, read and switched
on and off through the API, and the schedule dispatcher that beat ticks.

A record exists for every schedule, webhook and event trigger node of the workflow's
current version; `active` follows the workflow being published, `enabled` is the
user's switch. Saving re-syncs: a node removed from the graph loses its record (and a
webhook its address); a changed schedule starts counting from the save.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.activity.service import record
from backend.auth.dependencies import WorkspaceAccess
from backend.config import Settings, get_settings
from backend.executions import service as executions
from backend.kit import signing
from backend.kit.crypto import SecretBox, new_token
from backend.kit.db import UnitOfWork
from backend.kit.errors import NotFound, ValidationFailed
from backend.kit.logging import get_logger
from backend.kit.repository import Repository
from backend.models import Notification, NotificationSecret, Trigger, Workflow
from backend.triggers import schedule
from backend.workflows.graph import (
    EventTrigger,
    ScheduleTrigger,
    TriggerConfig,
    WebhookTrigger,
    WorkflowSettings,
)

log = get_logger(__name__)

KINDS = ("schedule", "webhook", "event")


class NotificationRepository(Repository[Notification]):
    model = Notification


_CONFIG: TypeAdapter[Any] = TypeAdapter(TriggerConfig)
TOKEN_PREFIX = "wh_"  # noqa: S105 - a prefix, not a secret


def _now() -> datetime:
    return datetime.now(UTC)


# Signing secrets are sealed together with the id of the row they belong to (a trigger,
# or a workflow for notification keys), so a ciphertext copied onto another row does
# not open there.
def seal_secret(settings: Settings, owner_id: uuid.UUID, secret: str) -> str:
    return SecretBox(settings).seal(f"{owner_id}:{secret}")


def open_secret(settings: Settings, owner_id: uuid.UUID, sealed: str) -> str:
    owner, _, secret = SecretBox(settings).open(sealed).partition(":")
    if owner != str(owner_id):
        raise ValueError("this secret belongs to another row")
    return secret


async def rotate_encryption(session: AsyncSession, settings: Settings) -> int:
    """Re-encrypt every webhook and notification signing secret under the current key
    (the companion of credentials' rotate_all, for SECURITY__ENCRYPTION_KEY rotation)."""
    box = SecretBox(settings)
    count = 0
    triggers = await session.scalars(
        select(Trigger).where(Trigger.secret_encrypted.is_not(None)).with_for_update()
    )
    for trigger in triggers.all():
        assert trigger.secret_encrypted is not None
        trigger.secret_encrypted = box.rotate(trigger.secret_encrypted)
        count += 1
    keys = await session.scalars(select(NotificationSecret).with_for_update())
    for key in keys.all():
        key.secret_encrypted = box.rotate(key.secret_encrypted)
        count += 1
    await session.flush()
    return count


def _trigger_nodes(definition: dict[str, Any]) -> dict[str, Any]:
    """node id -> validated config of every schedule/webhook/event trigger node (the
    definition was validated on save; anything odd is passed over)."""
    out: dict[str, Any] = {}
    for node in definition.get("nodes") or []:
        if not isinstance(node, dict) or node.get("type") != "trigger":
            continue
        config = node.get("config")
        if not isinstance(config, dict) or config.get("kind") not in KINDS:
            continue
        try:
            out[str(node["id"])] = _CONFIG.validate_python(config)
        except (ValidationError, KeyError):
            continue
    return out


def notification_settings(definition: dict[str, Any]) -> WorkflowSettings:
    try:
        return WorkflowSettings.model_validate(definition.get("settings") or {})
    except ValidationError:
        return WorkflowSettings()


async def sync(
    session: AsyncSession,
    workflow: Workflow,
    definition: dict[str, Any],
    *,
    now: datetime | None = None,
) -> None:
    """Bring the workflow's trigger records in line with `definition` (its current
    version) and its status. Called in the transaction that saves either."""
    now = now or _now()
    wanted = _trigger_nodes(definition)
    existing = {
        t.node_id: t
        for t in (
            await session.scalars(select(Trigger).where(Trigger.workflow_id == workflow.id))
        ).all()
    }
    active = workflow.status == "published"
    for node_id, config in wanted.items():
        raw = config.model_dump(mode="json")
        trigger = existing.pop(node_id, None)
        if trigger is None:
            trigger = Trigger(
                id=uuid.uuid4(),
                workspace_id=workflow.workspace_id,
                workflow_id=workflow.id,
                node_id=node_id,
                kind=config.kind,
                config=raw,
                enabled=True,
                active=False,
            )
            session.add(trigger)
        changed = trigger.kind != config.kind or trigger.config != raw
        starting = active and not trigger.active
        trigger.kind, trigger.config, trigger.active = config.kind, raw, active
        if isinstance(config, WebhookTrigger):
            trigger.token = trigger.token or new_token(TOKEN_PREFIX, 24)
        else:
            trigger.token, trigger.secret_encrypted = None, None
        trigger.source_workflow_id = (
            config.workflow_id if isinstance(config, EventTrigger) else None
        )
        if isinstance(config, ScheduleTrigger):
            # A schedule (re)starts counting from now: no backlog from before it ran.
            if changed or starting or trigger.next_run_at is None:
                trigger.next_run_at = schedule.first_slot(config, now)
        else:
            trigger.next_run_at = None
    for gone in existing.values():
        await session.delete(gone)
    settings = notification_settings(definition)
    if settings.notifications and settings.notifications.webhooks:
        await _notification_secret(session, workflow, create=True)
    await session.flush()


# API -------------------------------------------------------------------------------------


async def list_triggers(session: AsyncSession, workflow: Workflow) -> Sequence[Trigger]:
    rows = await session.scalars(
        select(Trigger).where(Trigger.workflow_id == workflow.id).order_by(Trigger.node_id)
    )
    return rows.all()


async def get(session: AsyncSession, workflow: Workflow, trigger_id: uuid.UUID) -> Trigger:
    # Scoped by the workflow the caller was granted: another workflow's trigger is a 404.
    trigger = await session.scalar(
        select(Trigger).where(Trigger.id == trigger_id, Trigger.workflow_id == workflow.id)
    )
    if trigger is None:
        raise NotFound("trigger not found")
    return trigger


def next_fire_times(trigger: Trigger, count: int, now: datetime | None = None) -> list[datetime]:
    if trigger.kind != "schedule" or not (trigger.enabled and trigger.active):
        return []
    try:
        config = ScheduleTrigger.model_validate(trigger.config)
    except ValueError:
        return []  # a stored schedule that no longer reads fires no more (dispatch_due)
    first = trigger.next_run_at or schedule.first_slot(config, now or _now())
    return [first, *schedule.next_times(config, first, count - 1)] if count > 1 else [first]


async def set_enabled(
    access: WorkspaceAccess, session: AsyncSession, trigger_id: uuid.UUID, enabled: bool
) -> Trigger:
    workflow: Workflow = access.resource
    trigger = await session.scalar(
        select(Trigger)
        .where(Trigger.id == trigger_id, Trigger.workflow_id == workflow.id)
        .with_for_update()
    )
    if trigger is None:
        raise NotFound("trigger not found")
    if enabled and not trigger.enabled and trigger.kind == "schedule":
        try:
            config = ScheduleTrigger.model_validate(trigger.config)
        except ValueError:
            raise ValidationFailed(
                "this schedule no longer reads: save the workflow with a valid one",
                field="config",
            ) from None
        # Slots passed while it was off are not a backlog.
        trigger.next_run_at = schedule.first_slot(config, _now())
    trigger.enabled = enabled
    await session.flush()
    _record(access, session, f"trigger.{'enable' if enabled else 'disable'}", trigger.id)
    return trigger


def _record(
    access: WorkspaceAccess, session: AsyncSession, action: str, resource_id: uuid.UUID
) -> None:
    record(
        session,
        access.principal,
        workspace_id=access.workspace.id,
        action=action,
        resource_type="trigger",
        resource_id=resource_id,
        details={"workflow_id": str(access.resource.id)},
    )


async def rotate_secret(
    access: WorkspaceAccess, session: AsyncSession, settings: Settings, trigger_id: uuid.UUID
) -> tuple[Trigger, str]:
    """A new signing secret for a webhook trigger: answered once, stored sealed."""
    trigger = await get(session, access.resource, trigger_id)
    if trigger.kind != "webhook":
        raise ValidationFailed("only webhook triggers have a signing secret", field="trigger_id")
    secret = signing.new_secret()
    trigger.secret_encrypted = seal_secret(settings, trigger.id, secret)
    await session.flush()
    _record(access, session, "trigger.secret_rotated", trigger.id)
    return trigger, secret


async def _notification_secret(
    session: AsyncSession, workflow: Workflow, *, create: bool
) -> NotificationSecret | None:
    row = await session.scalar(
        select(NotificationSecret).where(NotificationSecret.workflow_id == workflow.id)
    )
    if row is None and create:
        row = NotificationSecret(
            workflow_id=workflow.id,
            secret_encrypted=seal_secret(get_settings(), workflow.id, signing.new_secret()),
        )
        session.add(row)
    return row


async def rotate_notification_secret(
    access: WorkspaceAccess, session: AsyncSession, settings: Settings
) -> str:
    row = await _notification_secret(session, access.resource, create=True)
    assert row is not None
    secret = signing.new_secret()
    row.secret_encrypted = seal_secret(settings, access.resource.id, secret)
    await session.flush()
    _record(access, session, "notifications.secret_rotated", access.resource.id)
    return secret


async def list_notifications(
    session: AsyncSession, workflow: Workflow, *, limit: int, offset: int
) -> tuple[Sequence[Notification], int]:
    stmt = (
        select(Notification)
        .where(Notification.workflow_id == workflow.id)
        .order_by(Notification.created_at.desc(), Notification.id)
    )
    return await NotificationRepository(session).paginate(stmt, limit=limit, offset=offset)


# Dispatch --------------------------------------------------------------------------------


async def dispatch_due(uow: UnitOfWork, settings: Settings, now: datetime) -> list[uuid.UUID]:
    """One dispatch pass at `now`: claim due schedules (rows another dispatcher holds are
    skipped, not waited for), insert one run per slot to fire, advance `next_run_at`,
    all in this transaction; the runs are enqueued after it commits. The unique
    (trigger_id, scheduled_for) makes a slot fire once even if two dispatchers saw it."""
    session = uow.session
    grace = timedelta(seconds=settings.triggers.misfire_grace_s)
    rows = await session.execute(
        select(Trigger, Workflow)
        .join(Workflow, Workflow.id == Trigger.workflow_id)
        .where(
            Trigger.kind == "schedule",
            Trigger.enabled,
            Trigger.active,
            Trigger.next_run_at <= now,
        )
        .order_by(Trigger.next_run_at)
        .limit(settings.triggers.dispatch_batch)
        .with_for_update(of=Trigger, skip_locked=True)
    )
    started: list[uuid.UUID] = []
    for trigger, workflow in rows.all():
        assert trigger.next_run_at is not None
        try:
            config = ScheduleTrigger.model_validate(trigger.config)
            fire, upcoming = schedule.due(config, trigger.next_run_at, now, grace)
        except ValueError as exc:  # pydantic's ValidationError, croniter's errors
            # A stored schedule that no longer reads (a rule added since, a row edited by
            # hand) must not stop every other schedule: raised here, it rolled back the
            # whole pass on every tick. It stops being due (saving or enabling the
            # workflow again sets it anew) and says why in the log.
            log.error("trigger.schedule_unreadable", trigger_id=str(trigger.id),
                      workflow_id=str(workflow.id), error=str(exc)[:500])  # fmt: skip
            trigger.next_run_at = None
            continue
        for slot in fire:
            execution_id = await executions.start_unattended(
                uow,
                workflow,
                trigger_type="schedule",
                trigger_data={
                    "scheduled_for": slot.isoformat(),
                    "trigger_id": str(trigger.id),
                    "node_id": trigger.node_id,
                },
                trigger_id=trigger.id,
                scheduled_for=slot,
            )
            if execution_id is not None:
                started.append(execution_id)
        trigger.next_run_at = upcoming
        if fire:
            trigger.last_fired_at = fire[-1]
    await session.flush()
    return started
