"""What happens when a run ends: event triggers and workflow notifications.

Importing this module registers `execution_finished` with the lifecycle (a listener
registry: the lifecycle never imports the trigger domain). It is called inside the
transaction that moves an execution to a terminal status (the runner's close, a cancel
of a pending run, the delivery cap), so anything it inserts commits, or rolls back,
with that status change; tasks are enqueued only after that commit.

It is on the engine's hot path (every run ends here), so it costs one indexed query
for listeners (`ix_triggers_listeners`, a partial index over enabled, active event
triggers; asked inside the runner's closing statement, so no round trip of its own
there) and nothing more when the workflow has no notifications: a version's
settings never change, so they are cached per (workflow, version) in the process.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from backend.executions import lifecycle
from backend.kit.db import UnitOfWork
from backend.kit.tasks import enqueue_after_commit
from backend.models import Notification, Trigger, Workflow, WorkflowExecution, WorkflowVersion
from backend.workflows.graph import WorkflowSettings

DELIVER_TASK = "notifications.deliver"
OUTCOMES = ("completed", "failed")

# (channel, target, outcomes) per (workflow id, version); bounded, versions are immutable.
Targets = tuple[tuple[str, str, frozenset[str]], ...]
_CACHE_SIZE = 4096
_targets_cache: OrderedDict[tuple[uuid.UUID, int], Targets] = OrderedDict()


def notification_targets(settings: WorkflowSettings) -> Targets:
    out: list[tuple[str, str, frozenset[str]]] = [
        ("email", address, frozenset({"failed"})) for address in settings.notify_on_failure
    ]
    n = settings.notifications
    if n is not None:
        on = frozenset(n.on)
        out += [("email", address, on) for address in n.emails]
        out += [("webhook", hook.url, on) for hook in n.webhooks]
    return tuple(out)


def remember_settings(workflow_id: uuid.UUID, version: int, settings: WorkflowSettings) -> None:
    """A version's settings, from a graph the caller validated anyway (the worker's graph
    cache): its runs then end without reading them. Runs of a new version that end
    together each read them otherwise (measured: 9 reads for 12 runs); a shared read
    would need a second pooled connection while every closing run holds one (a pool
    of 20 deadlocked on it under a burst)."""
    _remember((workflow_id, version), notification_targets(settings))


def _remember(key: tuple[uuid.UUID, int], targets: Targets) -> None:
    _targets_cache[key] = targets
    if len(_targets_cache) > _CACHE_SIZE:
        _targets_cache.popitem(last=False)


async def _targets(uow: UnitOfWork, workflow_id: uuid.UUID, version: int) -> Targets:
    key = (workflow_id, version)
    cached = _targets_cache.get(key)
    if cached is not None:
        _targets_cache.move_to_end(key)
        return cached
    # On the caller's own session: a close holds its connection while it runs the hooks.
    raw = await uow.session.scalar(
        select(WorkflowVersion.definition["settings"]).where(
            WorkflowVersion.workflow_id == workflow_id, WorkflowVersion.number == version
        )
    )
    try:
        settings = WorkflowSettings.model_validate(raw or {})
    except ValueError:
        settings = WorkflowSettings()
    targets = notification_targets(settings)
    _remember(key, targets)
    return targets


def _summary(execution: WorkflowExecution) -> dict[str, Any]:
    return {
        "workflow_id": str(execution.workflow_id),
        "execution_id": str(execution.id),
        "status": str(execution.status),
        "output": execution.output,
        "error": execution.error,
    }


# The runner's close answers "does anyone listen?" in its own statement (the same
# partial index), so a run without listeners ends without this module's query.
lifecycle.fact_at_close(
    "has_listeners",
    "EXISTS (SELECT 1 FROM triggers t WHERE t.source_workflow_id = closed.workflow_id"
    " AND t.kind = 'event' AND t.enabled AND t.active"
    " AND t.workspace_id = closed.workspace_id)",
)


async def _start_listeners(uow: UnitOfWork, execution: WorkflowExecution, outcome: str) -> None:
    facts = uow.session.info.get(lifecycle.CLOSE_FACTS, {}).get(execution.id, {})
    if facts.get("has_listeners") is False:
        return
    # Plain columns, no join: almost every run has no listener, and this is the whole
    # cost then (measured: an ORM entity join here cost several times more).
    listeners = (
        await uow.session.execute(
            select(Trigger.id, Trigger.workflow_id, Trigger.config).where(
                Trigger.source_workflow_id == execution.workflow_id,
                Trigger.kind == "event",
                Trigger.enabled,
                Trigger.active,
                Trigger.workspace_id == execution.workspace_id,
            )
        )
    ).all()
    if not listeners:
        return
    for trigger_id, workflow_id, config in listeners:
        workflow = await uow.session.get(Workflow, workflow_id)
        if workflow is None or outcome not in config.get("on", ["completed"]):
            continue
        await lifecycle.create_run(
            uow,
            workspace_id=workflow.workspace_id,
            workflow_id=workflow.id,
            version=workflow.current_version,
            trigger_type="event",
            # The source run's output is the input; templates read trigger.output.
            trigger_data=_summary(execution),
            actor=f"trigger:{trigger_id}",
            reason=f"started (event: {execution.id} {outcome})",
            skip_duplicate=True,
            trigger_id=trigger_id,
            # One run per (listener, source run), whatever happens to this hook.
            idempotency_key=f"event:{trigger_id}:{execution.id}",
        )


async def _queue_notifications(uow: UnitOfWork, execution: WorkflowExecution, outcome: str) -> None:
    targets = await _targets(uow, execution.workflow_id, execution.version)
    for channel, target, on in targets:
        if outcome not in on:
            continue
        notification_id = await uow.session.scalar(
            pg_insert(Notification)
            .values(
                id=uuid.uuid4(),
                workspace_id=execution.workspace_id,
                workflow_id=execution.workflow_id,
                execution_id=execution.id,
                event=outcome,
                channel=channel,
                target=target,
            )
            .on_conflict_do_nothing()
            .returning(Notification.id)
        )
        if notification_id is not None:
            enqueue_after_commit(uow, DELIVER_TASK, str(notification_id))


@lifecycle.on_finished
async def execution_finished(uow: UnitOfWork, execution: WorkflowExecution) -> None:
    """Start the workflows whose event triggers listen for this outcome and queue the
    workflow's notifications. Cancelled runs do neither: someone chose to stop them."""
    outcome = str(execution.status)
    if outcome not in OUTCOMES:
        return
    await _start_listeners(uow, execution, outcome)
    await _queue_notifications(uow, execution, outcome)
