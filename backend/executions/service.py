"""Starting, reading, cancelling, retrying and re-running executions. Enqueueing always
waits for the commit; a crash in between is caught by the reaper (a pending run nobody
claimed is enqueued again)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from backend.activity.service import record
from backend.auth.dependencies import WorkspaceAccess
from backend.executions.schemas import ExecutionCreate, ExecutionRead, LogEntry, NodeSummary
from backend.executions.state import TERMINAL_EXECUTION, ExecutionStatus, NodeStatus, transition
from backend.kit.db import UnitOfWork
from backend.kit.errors import Conflict, InvalidTransition, NotFound
from backend.kit.repository import Repository
from backend.kit.tasks import enqueue_after_commit
from backend.models import NodeExecution, Workflow, WorkflowExecution
from backend.realtime.events import publish_after_commit
from backend.triggers.hooks import execution_finished

EXECUTE_TASK = "workflow.execute"
E = ExecutionStatus


class ExecutionRepository(Repository[WorkflowExecution]):
    model = WorkflowExecution


def _enqueue(uow: UnitOfWork, execution: WorkflowExecution) -> None:
    enqueue_after_commit(uow, EXECUTE_TASK, str(execution.id))


async def _new_run(
    uow: UnitOfWork,
    access: WorkspaceAccess,
    workflow: Workflow,
    *,
    version: int,
    trigger_type: str,
    trigger_data: dict[str, Any],
    idempotency_key: str | None = None,
    retry_of: uuid.UUID | None = None,
) -> WorkflowExecution:
    execution = WorkflowExecution(
        id=uuid.uuid4(),
        workspace_id=workflow.workspace_id,
        workflow_id=workflow.id,
        version=version,
        trigger_type=trigger_type,
        trigger_data=trigger_data,
        idempotency_key=idempotency_key,
        retry_of=retry_of,
        created_by=access.user.id,
        status=E.PENDING,
    )
    uow.session.add(execution)
    await uow.session.flush()
    _enqueue(uow, execution)
    return execution


async def start(
    uow: UnitOfWork, access: WorkspaceAccess, data: ExecutionCreate, idempotency_key: str | None
) -> tuple[WorkflowExecution, bool]:
    """(execution, created). The same Idempotency-Key gives back the same execution."""
    session = uow.session
    if idempotency_key:
        existing = await session.scalar(
            select(WorkflowExecution).where(
                WorkflowExecution.workspace_id == access.workspace.id,
                WorkflowExecution.idempotency_key == idempotency_key,
            )
        )
        if existing is not None:
            if existing.workflow_id != data.workflow_id:
                raise Conflict(
                    "this Idempotency-Key was used for another workflow", field="Idempotency-Key"
                )
            return existing, False
    workflow: Workflow = access.resource
    if workflow.status == "archived":
        raise Conflict(
            "an archived workflow cannot run; move it back to draft first", field="workflow_id"
        )
    try:
        async with session.begin_nested():
            execution = await _new_run(
                uow,
                access,
                workflow,
                version=workflow.current_version,
                trigger_type=data.trigger_type,
                trigger_data=data.trigger_data,
                idempotency_key=idempotency_key,
            )
    except IntegrityError:
        # The same key raced in from a concurrent retry of the request: theirs won.
        existing = await session.scalar(
            select(WorkflowExecution).where(
                WorkflowExecution.workspace_id == access.workspace.id,
                WorkflowExecution.idempotency_key == idempotency_key,
            )
        )
        if existing is None:
            raise
        return existing, False
    record(
        session,
        access.principal,
        workspace_id=workflow.workspace_id,
        action="execution.start",
        resource_type="execution",
        resource_id=execution.id,
        details={"workflow_id": str(workflow.id), "version": execution.version},
    )
    return execution, True


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
    (trigger_id, scheduled_for) or the idempotency key already has its run: the unique
    constraints decide, so two dispatchers can never both fire one slot."""
    execution_id = await uow.session.scalar(
        pg_insert(WorkflowExecution)
        .values(
            id=uuid.uuid4(),
            workspace_id=workflow.workspace_id,
            workflow_id=workflow.id,
            version=workflow.current_version,
            trigger_type=trigger_type,
            trigger_data=trigger_data,
            trigger_id=trigger_id,
            scheduled_for=scheduled_for,
            idempotency_key=idempotency_key,
            status=E.PENDING,
        )
        .on_conflict_do_nothing()
        .returning(WorkflowExecution.id)
    )
    if execution_id is not None:
        enqueue_after_commit(uow, EXECUTE_TASK, str(execution_id))
    return execution_id


async def node_rows(session: AsyncSession, execution_id: uuid.UUID) -> Sequence[NodeExecution]:
    rows = await session.scalars(
        select(NodeExecution)
        .where(NodeExecution.execution_id == execution_id)
        .order_by(
            NodeExecution.started_at.nulls_last(), NodeExecution.node_id, NodeExecution.iteration
        )
    )
    return rows.all()


async def read(uow: UnitOfWork, access: WorkspaceAccess) -> ExecutionRead:
    execution: WorkflowExecution = access.resource
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
    stmt = select(WorkflowExecution).where(WorkflowExecution.workspace_id == access.workspace.id)
    if workflow_id:
        stmt = stmt.where(WorkflowExecution.workflow_id == workflow_id)
    if status:
        stmt = stmt.where(WorkflowExecution.status == status)
    if since:
        stmt = stmt.where(WorkflowExecution.created_at >= since)
    if until:
        stmt = stmt.where(WorkflowExecution.created_at < until)
    stmt = stmt.order_by(WorkflowExecution.created_at.desc(), WorkflowExecution.id)
    return await ExecutionRepository(uow.session).paginate(stmt, limit=limit, offset=offset)


async def cancel(uow: UnitOfWork, access: WorkspaceAccess) -> WorkflowExecution:
    session = uow.session
    execution = await session.get(
        WorkflowExecution, access.resource.id, with_for_update=True, populate_existing=True
    )
    if execution is None:
        raise NotFound("execution not found")
    if execution.status in TERMINAL_EXECUTION:
        raise InvalidTransition(
            f"a {execution.status} execution cannot be cancelled", field="status"
        )
    await cancel_tree(uow, execution, datetime.now(UTC))
    record(
        session,
        access.principal,
        workspace_id=execution.workspace_id,
        action="execution.cancel",
        resource_type="execution",
        resource_id=execution.id,
    )
    return execution


async def cancel_tree(uow: UnitOfWork, execution: WorkflowExecution, now: datetime) -> None:
    """Ask a run and every unfinished sub-run under it to stop. Runs nobody is running
    (pending, or whose worker let go) are cancelled here and now; a running one is
    cancelled by its worker, which checks several times a second."""
    session = uow.session
    tree = (
        select(WorkflowExecution.id)
        .where(WorkflowExecution.parent_execution_id == execution.id)
        .cte("tree", recursive=True)
    )
    tree = tree.union_all(
        select(WorkflowExecution.id).where(WorkflowExecution.parent_execution_id == tree.c.id)
    )
    children = await session.scalars(
        select(WorkflowExecution)
        .where(
            WorkflowExecution.id.in_(select(tree.c.id)),
            WorkflowExecution.status.not_in(TERMINAL_EXECUTION),
        )
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    for run in [execution, *children.all()]:
        run.cancel_requested_at = run.cancel_requested_at or now
        live_lease = run.lease_owner is not None and (
            run.lease_expires_at is None or run.lease_expires_at > now
        )
        if run.status == E.PENDING or not live_lease:
            await cancel_now(uow, run, now)
    await session.flush()


async def cancel_now(uow: UnitOfWork, execution: WorkflowExecution, now: datetime) -> None:
    """Cancel a run that no worker holds, with its retry waits."""
    transition("execution", execution.status, E.CANCELLED, at=now)
    execution.status = E.CANCELLED
    execution.finished_at = now
    execution.lease_owner = None
    execution.lease_expires_at = None
    execution.error = execution.error or {"message": "cancelled"}
    pending = await uow.session.scalars(
        select(NodeExecution).where(
            NodeExecution.execution_id == execution.id,
            NodeExecution.status == NodeStatus.RETRYING,
        )
    )
    for row in pending.all():
        row.status = NodeStatus.CANCELLED
    publish_after_commit(uow, execution)
    await execution_finished(uow, execution)


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
        retry_of=source.id,
    )
    for row in await node_rows(uow.session, source.id):
        if row.status == NodeStatus.COMPLETED:
            uow.session.add(
                NodeExecution(
                    execution_id=execution.id,
                    node_id=row.node_id,
                    iteration=row.iteration,
                    status=row.status,
                    branch=row.branch,
                    attempt=row.attempt,
                    input=row.input,
                    output=row.output,
                    started_at=row.started_at,
                    finished_at=row.finished_at,
                    duration_ms=row.duration_ms,
                    input_tokens=0,
                    output_tokens=0,
                    cost_usd=0.0,
                )
            )
    await uow.session.flush()
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
