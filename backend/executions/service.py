"""Starting, reading, cancelling, retrying and re-running executions. Status changes go
through the lifecycle (backend/executions/lifecycle.py); enqueueing always waits for the
commit, and a crash in between is caught by the reaper (a pending run nobody claimed is
enqueued again)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
from redis.asyncio import Redis
from sqlalchemy import bindparam, cast, literal, select, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from backend.activity.service import announce_entry, entry_values, record
from backend.auth.dependencies import Principal, WorkspaceAccess
from backend.executions import lifecycle
from backend.executions import repository as repo
from backend.executions.schemas import (
    ExecutionBatchCreate,
    ExecutionCreate,
    ExecutionRead,
    LogEntry,
    NodeSummary,
    TransitionRead,
)
from backend.executions.state import TERMINAL_EXECUTION, ExecutionStatus, NodeStatus
from backend.kit import rawsql
from backend.kit.db import UnitOfWork
from backend.kit.errors import (
    Conflict,
    InvalidTransition,
    NotFound,
    QuotaExceeded,
    ValidationFailed,
)
from backend.kit.logging import get_logger
from backend.models import NodeExecution, Workflow, WorkflowExecution
from backend.realtime.events import EXECUTION_STATUS, channel

log = get_logger(__name__)

EXECUTE_TASK = lifecycle.EXECUTE_TASK
E = ExecutionStatus


def actor_of(principal: Principal) -> str:
    """Who made a change, as the run's history names them."""
    if principal.api_key is not None:
        return f"api_key:{principal.api_key.id}"
    return f"user:{principal.user_id}"


async def _new_run(
    uow: UnitOfWork,
    access: WorkspaceAccess,
    workflow: Workflow,
    *,
    version: int,
    trigger_type: str,
    trigger_data: dict[str, Any],
    reason: str,
    idempotency_key: str | None = None,
    retry_of: uuid.UUID | None = None,
) -> WorkflowExecution:
    execution = await lifecycle.create_run(
        uow,
        workspace_id=workflow.workspace_id,
        workflow_id=workflow.id,
        version=version,
        trigger_type=trigger_type,
        trigger_data=trigger_data,
        actor=actor_of(access.principal),
        reason=reason,
        idempotency_key=idempotency_key,
        retry_of=retry_of,
        created_by=access.principal.user_id,
    )
    assert execution is not None
    return execution


async def workflow_to_run(session: AsyncSession, workflow_id: uuid.UUID) -> Any:
    """What starting a run needs of its workflow (id, workspace, status, current
    version) as one row through the driver (backend/kit/rawsql.py), not an ORM object:
    the access check of POST /executions and /executions/batch. None: no such workflow."""
    return await rawsql.fetch_one(session, _RUN_TARGET, {"workflow_id": workflow_id})


_RUN_TARGET = select(
    Workflow.id, Workflow.workspace_id, Workflow.status, Workflow.current_version
).where(Workflow.id == bindparam("workflow_id"))


async def start(
    uow: UnitOfWork, access: WorkspaceAccess, data: ExecutionCreate, idempotency_key: str | None
) -> tuple[WorkflowExecution, bool]:
    """(execution, created). The same Idempotency-Key gives back the same execution.

    Admission is one statement (backend/executions/admission.py): the run's INSERT
    (with ON CONFLICT DO NOTHING on the key: the insert is the idempotency check, so a
    first request pays no lookup and no savepoint), its history row and its activity
    entry; then the commit, after which the message and the live feed's notice go out."""
    workflow: Workflow = access.resource
    if workflow.status == "archived":
        existing = await _replayed(uow.session, access, data, idempotency_key)
        if existing is not None:
            return existing, False
        raise Conflict(
            "an archived workflow cannot run; move it back to draft first", field="workflow_id"
        )
    # The activity entry goes in with the run (one statement, no ORM flush at commit);
    # its resource_id is the run's id, filled in by that statement.
    entry = entry_values(
        access.principal,
        workspace_id=workflow.workspace_id,
        action="execution.start",
        resource_type="execution",
        details={"workflow_id": str(workflow.id), "version": workflow.current_version},
    )
    try:
        execution = await lifecycle.create_run(
            uow,
            workspace_id=workflow.workspace_id,
            workflow_id=workflow.id,
            version=workflow.current_version,
            trigger_type=data.trigger_type,
            trigger_data=data.trigger_data,
            actor=actor_of(access.principal),
            reason=f"started ({data.trigger_type})",
            # Only a key can collide (API runs have no schedule slot).
            skip_duplicate=idempotency_key is not None,
            activity=entry,
            idempotency_key=idempotency_key,
            created_by=access.principal.user_id,
        )
    except QuotaExceeded:
        # Quotas are admitted before the insert finds the key taken: a retry of a start
        # that already has its run answers that run, even once the quota is used up.
        existing = await _replayed(uow.session, access, data, idempotency_key)
        if existing is not None:
            return existing, False
        raise
    if execution is None:
        # The key already has its run: an earlier request, or a concurrent retry whose
        # insert committed first (ON CONFLICT waited for it).
        existing = await _replayed(uow.session, access, data, idempotency_key)
        if existing is None:
            raise Conflict("this Idempotency-Key is in use; retry", field="Idempotency-Key")
        return existing, False
    entry["resource_id"] = str(execution.id)
    announce_entry(uow.session, access.principal, entry)
    return execution, True


async def _replayed(
    session: AsyncSession, access: WorkspaceAccess, data: ExecutionCreate, key: str | None
) -> WorkflowExecution | None:
    """The run an earlier start with this key made (None without a key or a run)."""
    if key is None:
        return None
    existing = await repo.find_by_key(session, access.workspace_id, key)
    if existing is not None and existing.workflow_id != data.workflow_id:
        raise Conflict(
            "this Idempotency-Key was used for another workflow", field="Idempotency-Key"
        )
    if existing is not None and (
        existing.trigger_type != data.trigger_type
        or not await _same_trigger_data(session, existing.id, data.trigger_data)
    ):
        # A retry sends the same request; a different one under a used key is a client's
        # mistake, and answering the first run would hide that its input was dropped.
        raise Conflict(
            "this Idempotency-Key was used with another trigger_type or trigger_data",
            field="Idempotency-Key",
        )
    return existing


async def _same_trigger_data(
    session: AsyncSession, execution_id: uuid.UUID, trigger_data: dict[str, Any]
) -> bool:
    """Compared by PostgreSQL, as jsonb on both sides: what came back from the row is
    not what was sent for every number (jsonb keeps `1e23` as a 24-digit integer)."""
    sent = cast(literal(json.dumps(trigger_data)), JSONB)
    same = await session.scalar(
        select(WorkflowExecution.trigger_data == sent).where(WorkflowExecution.id == execution_id)
    )
    return bool(same)


# The batch's runs (by key) whose input differs from the request's item at that key;
# jsonb on both sides, as for a single start.
_BATCH_DIFFERS = text(
    "SELECT 1 FROM workflow_executions e"
    " JOIN unnest(CAST(:keys AS text[]), CAST(:datas AS jsonb[])) AS r(k, d)"
    " ON e.idempotency_key = r.k"
    " WHERE e.workspace_id = :ws AND (e.trigger_data <> r.d OR e.trigger_type <> :tt)"
    " LIMIT 1"
)


async def _same_batch(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    data: ExecutionBatchCreate,
    keys: list[str | None],
) -> bool:
    differs = await session.scalar(
        _BATCH_DIFFERS,
        {
            "keys": [k for k in keys if k],
            "datas": [json.dumps(item.trigger_data) for item in data.items],
            "ws": workspace_id,
            "tt": data.trigger_type,
        },
    )
    return differs is None


# Room for `batch:` and `#499` in the 200 characters an idempotency key may have.
BATCH_KEY_MAX = 186


async def start_many(
    uow: UnitOfWork,
    access: WorkspaceAccess,
    data: ExecutionBatchCreate,
    idempotency_key: str | None,
) -> list[uuid.UUID]:
    """One run per item, in one transaction; ids in the items' order. With an
    Idempotency-Key, item i gets the key `<key>#<i>`, so a retried batch answers the
    runs the first one created instead of starting them again."""
    workflow: Workflow = access.resource
    if workflow.status == "archived":
        raise Conflict(
            "an archived workflow cannot run; move it back to draft first", field="workflow_id"
        )
    if idempotency_key and len(idempotency_key) > BATCH_KEY_MAX:
        raise ValidationFailed(
            f"a batch's Idempotency-Key is at most {BATCH_KEY_MAX} characters",
            field="Idempotency-Key",
        )
    # Their own namespace: a single start with the key `<K>` never meets a batch's runs.
    keys = [
        f"batch:{idempotency_key}#{i}" if idempotency_key else None for i in range(len(data.items))
    ]
    rows = [
        {
            "workspace_id": workflow.workspace_id,
            "workflow_id": workflow.id,
            "version": workflow.current_version,
            "trigger_type": data.trigger_type,
            "trigger_data": item.trigger_data,
            "idempotency_key": key,
            "created_by": access.principal.user_id,
        }
        for item, key in zip(data.items, keys, strict=True)
    ]
    created = await lifecycle.create_runs(
        uow, rows, actor=actor_of(access.principal), reason=f"started ({data.trigger_type}, batch)"
    )
    if idempotency_key:
        found = await repo.find_by_keys(uow.session, workflow.workspace_id, [k for k in keys if k])
        runs = [found[k] for k in keys if k in found]
        if len(runs) != len(keys) or any(w != workflow.id for _, w in runs):
            raise Conflict(
                "this Idempotency-Key was used for another batch", field="Idempotency-Key"
            )
        # A retry is the same batch: some of its runs new and some found means another
        # length (a longer one's extra items were just started), and a run at the index
        # past this batch's end means the first one was longer.
        longer = await repo.find_by_keys(
            uow.session, workflow.workspace_id, [f"batch:{idempotency_key}#{len(keys)}"]
        )
        if (
            0 < len(created) < len(keys)
            or longer
            or (
                not created
                and not await _same_batch(uow.session, workflow.workspace_id, data, keys)
            )
        ):
            raise Conflict(
                "this Idempotency-Key was used with other items or another trigger_type",
                field="Idempotency-Key",
            )
        ids = [run_id for run_id, _ in runs]
    else:
        ids = created
    record(
        uow.session,
        access.principal,
        workspace_id=workflow.workspace_id,
        action="execution.start_batch",
        resource_type="workflow",
        resource_id=workflow.id,
        details={"runs": len(ids), "started": len(created), "version": workflow.current_version},
    )
    return ids


async def start_unattended(
    uow: UnitOfWork,
    workflow: Workflow,
    *,
    trigger_type: str,
    trigger_data: dict[str, Any],
    trigger_id: uuid.UUID | None = None,
    scheduled_for: datetime | None = None,
    idempotency_key: str | None = None,
) -> uuid.UUID | None:
    """A run nobody started in person (a schedule, webhook or event trigger): pinned to
    the workflow's current version, no user, enqueued after commit. None when the slot
    (trigger_id, scheduled_for) or the idempotency key already has its run."""
    execution = await lifecycle.create_run(
        uow,
        workspace_id=workflow.workspace_id,
        workflow_id=workflow.id,
        version=workflow.current_version,
        trigger_type=trigger_type,
        trigger_data=trigger_data,
        actor=f"trigger:{trigger_id}" if trigger_id else trigger_type,
        reason=f"started ({trigger_type})",
        skip_duplicate=True,
        trigger_id=trigger_id,
        scheduled_for=scheduled_for,
        idempotency_key=idempotency_key,
    )
    return execution.id if execution is not None else None


async def node_rows(session: AsyncSession, execution_id: uuid.UUID) -> Sequence[NodeExecution]:
    return await repo.node_rows(session, execution_id)


async def read(
    uow: UnitOfWork, access: WorkspaceAccess, execution: WorkflowExecution | None = None
) -> ExecutionRead:
    if execution is None:
        execution = access.resource
        await uow.session.refresh(execution)
    rows = await node_rows(uow.session, execution.id)
    out = ExecutionRead.model_validate(execution)
    out.nodes = [
        NodeSummary(
            node_id=r.node_id, status=r.status, attempt=r.attempt, duration_ms=r.duration_ms
        )
        for r in rows
        if r.iteration == 0
    ]
    return out


async def list_executions(
    uow: UnitOfWork,
    access: WorkspaceAccess,
    *,
    workflow_id: uuid.UUID | None,
    status: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    offset: int,
) -> tuple[Sequence[WorkflowExecution], int]:
    stmt = repo.list_statement(
        access.workspace_id, workflow_id=workflow_id, status=status, since=since, until=until
    )
    return await repo.ExecutionRepository(uow.session).paginate(stmt, limit=limit, offset=offset)


async def cancel(uow: UnitOfWork, access: WorkspaceAccess) -> WorkflowExecution:
    session = uow.session
    execution = await repo.lock_run(session, access.resource.id)
    if execution is None:
        raise NotFound("execution not found")
    if execution.status in TERMINAL_EXECUTION:
        raise InvalidTransition(
            f"a {execution.status} execution cannot be cancelled", field="status"
        )
    await lifecycle.cancel_tree(uow, execution, datetime.now(UTC), actor=actor_of(access.principal))
    record(
        session,
        access.principal,
        workspace_id=execution.workspace_id,
        action="execution.cancel",
        resource_type="execution",
        resource_id=execution.id,
    )
    return execution


async def retry(uow: UnitOfWork, access: WorkspaceAccess) -> WorkflowExecution:
    """A new run of the same version that reuses every completed node's output and runs
    only what failed (and what depends on it)."""
    source: WorkflowExecution = access.resource
    if source.status not in (E.FAILED, E.CANCELLED):
        raise InvalidTransition(
            f"only failed or cancelled executions can be retried, not {source.status}",
            field="status",
        )
    workflow = await uow.session.get(Workflow, source.workflow_id)
    if workflow is None:
        raise NotFound("workflow not found")
    if workflow.status == "archived":
        raise Conflict("an archived workflow cannot run; move it back to draft first")
    execution = await _new_run(
        uow,
        access,
        workflow,
        version=source.version,
        trigger_type=source.trigger_type,
        trigger_data=source.trigger_data,
        reason=f"retry of {source.id}",
        retry_of=source.id,
    )
    # In the same transaction: the message goes out after the commit, copies included.
    await repo.copy_completed_nodes(uow.session, source.id, execution.id)
    record(
        uow.session,
        access.principal,
        workspace_id=workflow.workspace_id,
        action="execution.retry",
        resource_type="execution",
        resource_id=execution.id,
        details={"retry_of": str(source.id)},
    )
    return execution


async def rerun(uow: UnitOfWork, access: WorkspaceAccess) -> WorkflowExecution:
    """A fresh run of the same input on the workflow's current version."""
    source: WorkflowExecution = access.resource
    workflow = await uow.session.get(Workflow, source.workflow_id)
    if workflow is None:
        raise NotFound("workflow not found")
    if workflow.status == "archived":
        raise Conflict("an archived workflow cannot run; move it back to draft first")
    execution = await _new_run(
        uow,
        access,
        workflow,
        version=workflow.current_version,
        trigger_type=source.trigger_type,
        trigger_data=source.trigger_data,
        reason=f"re-run of {source.id}",
    )
    record(
        uow.session,
        access.principal,
        workspace_id=workflow.workspace_id,
        action="execution.rerun",
        resource_type="execution",
        resource_id=execution.id,
        details={"rerun_of": str(source.id)},
    )
    return execution


async def logs(uow: UnitOfWork, access: WorkspaceAccess) -> list[LogEntry]:
    execution: WorkflowExecution = access.resource
    entries = [
        LogEntry(
            at=execution.created_at,
            level="info",
            node_id=None,
            message=f"queued ({execution.trigger_type} trigger, version {execution.version})",
        )
    ]
    if execution.started_at:
        entries.append(
            LogEntry(at=execution.started_at, level="info", node_id=None, message="started")
        )
    for row in await node_rows(uow.session, execution.id):
        level = (
            "error"
            if row.status == NodeStatus.FAILED
            else "warning"
            if row.status == NodeStatus.RETRYING
            else "info"
        )
        message = f"{row.status} after attempt {row.attempt}" if row.attempt else row.status
        if row.error:
            message += f": {row.error.get('message')}"
        entries.append(
            LogEntry(
                at=row.finished_at or row.started_at,
                level=level,
                node_id=row.node_id,
                message=message,
            )
        )
    if execution.finished_at:
        level = "error" if execution.status == E.FAILED else "info"
        entries.append(
            LogEntry(
                at=execution.finished_at, level=level, node_id=None, message=f"{execution.status}"
            )
        )
    return entries


async def transitions(uow: UnitOfWork, access: WorkspaceAccess) -> list[TransitionRead]:
    rows = await lifecycle.history(uow.session, access.resource.id)
    return [TransitionRead.model_validate(r) for r in rows]


def _ends_run(message: dict[str, Any] | None) -> bool:
    if not message or message.get("type") != "message":
        return False
    try:
        body = json.loads(message["data"])
    except (TypeError, ValueError):
        return False
    return bool(body.get("type") == EXECUTION_STATUS and body.get("status") in TERMINAL_EXECUTION)


async def wait_for_end(
    uow: UnitOfWork, redis: Redis, execution_id: uuid.UUID, wait_s: float
) -> WorkflowExecution | None:
    """The run once it ended, or None if it is still going after `wait_s`. Woken by the
    run's terminal event on its channel; the row is read once after subscribing (a run
    that ended before that) and once at the end (an event lost while Redis blinked),
    never polled. Without Redis the caller gets None (202): the run itself is safe."""

    async def row() -> WorkflowExecution | None:
        run = await repo.get_run(uow.session, execution_id)
        await uow.session.commit()  # no transaction left open while waiting
        return run if run is not None and run.status in TERMINAL_EXECUTION else None

    deadline = time.monotonic() + wait_s
    try:
        async with redis.pubsub() as pubsub:
            await pubsub.subscribe(channel(execution_id))
            ended = await row()
            if ended is not None:
                return ended
            with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                while True:
                    left = max(0.0, deadline - time.monotonic())
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=min(left, 5.0)
                    )
                    if _ends_run(message):
                        break
    except (OSError, ConnectionError, TimeoutError) as exc:
        log.warning("execution.wait_unavailable", execution_id=str(execution_id), error=str(exc))
        return None
    except SQLAlchemyError as exc:
        # The run is committed and enqueued: say so (202) rather than fail the request,
        # which a client would retry into a second run.
        log.warning("execution.wait_failed", execution_id=str(execution_id), error=str(exc))
        return None
    except Exception as exc:  # redis.exceptions.RedisError and kin
        if type(exc).__module__.startswith("redis"):
            log.warning(
                "execution.wait_unavailable", execution_id=str(execution_id), error=str(exc)
            )
            return None
        raise
    return await row()
