"""All SQL on `workflow_executions`, `node_executions` and `execution_transitions`.

Only the lifecycle (`backend/executions/lifecycle.py`) writes a status through these
statements, and it passes the status in: nothing here decides one. The engine's hot-path
statements are built once at import and executed with parameters (building a statement
per node cost more than the round trip to PostgreSQL): the one-statement claim, the
checkpoint upsert and the fenced close. Each of them writes the transition it makes into
the run's history in the same statement (a data-modifying CTE), so history costs no
round trip of its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    String,
    bindparam,
    exists,
    func,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from backend.kit.repository import Repository
from backend.models import ExecutionTransition, NodeExecution, WorkflowExecution

EX, NE, TR = WorkflowExecution, NodeExecution, ExecutionTransition
# The (execution, node, iteration) unique constraint checkpoints upsert on.
NODE_KEY = "uq_node_executions_execution_id_node_id_iteration"
IDEMPOTENCY_KEY = "uq_workflow_executions_workspace_id_idempotency_key"
UNFINISHED = ("pending", "running")
TERMINAL = ("completed", "failed", "cancelled")


class ExecutionRepository(Repository[WorkflowExecution]):
    model = WorkflowExecution


# History ---------------------------------------------------------------------------------


def history_row(
    execution_id: uuid.UUID,
    from_status: str | None,
    to_status: str,
    *,
    at: datetime,
    actor: str | None,
    reason: str | None = None,
    node_id: str | None = None,
    iteration: int = 0,
) -> dict[str, Any]:
    return {
        "execution_id": execution_id,
        "node_id": node_id,
        "iteration": iteration,
        "from_status": from_status,
        "to_status": to_status,
        "reason": reason,
        "actor": actor,
        "at": at,
    }


async def add_history(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        await session.execute(insert(TR), list(rows))


async def history(session: AsyncSession, execution_id: uuid.UUID) -> Sequence[ExecutionTransition]:
    rows = await session.scalars(select(TR).where(TR.execution_id == execution_id).order_by(TR.id))
    return rows.all()


# Creating runs ---------------------------------------------------------------------------


async def insert_run(
    session: AsyncSession, values: dict[str, Any], *, skip_duplicate: bool
) -> WorkflowExecution | None:
    """Insert a run and return its row; with `skip_duplicate`, None when a unique key
    (idempotency key, schedule slot) already has its run."""
    stmt = insert(EX).values(**values)
    if skip_duplicate:
        stmt = stmt.on_conflict_do_nothing()
    row = await session.scalar(stmt.returning(EX), execution_options={"populate_existing": True})
    return row


async def find_by_key(
    session: AsyncSession, workspace_id: uuid.UUID, key: str
) -> WorkflowExecution | None:
    return await session.scalar(
        select(EX).where(EX.workspace_id == workspace_id, EX.idempotency_key == key)
    )


async def latest_child(
    session: AsyncSession, workspace_id: uuid.UUID, parent_id: uuid.UUID, key_prefix: str
) -> Any:
    """The newest child run a parent's node started (its key starts with the prefix)."""
    return (
        await session.execute(
            select(EX.id, EX.status, EX.idempotency_key)
            .where(
                EX.workspace_id == workspace_id,
                EX.parent_execution_id == parent_id,
                EX.idempotency_key.startswith(key_prefix),
            )
            .order_by(EX.created_at.desc())
            .limit(1)
        )
    ).one_or_none()


async def copy_completed_nodes(
    session: AsyncSession, source_id: uuid.UUID, target_id: uuid.UUID
) -> None:
    """A retry reuses every completed node of its source (tokens count once, there)."""
    columns = ["status", "branch", "attempt", "input", "output", "started_at", "finished_at"]
    columns += ["duration_ms"]
    await session.execute(
        insert(NE).from_select(
            ["id", "execution_id", "node_id", "iteration", *columns],
            select(
                func.gen_random_uuid(),
                literal(target_id),
                NE.node_id,
                NE.iteration,
                *[NE.__table__.c[c] for c in columns],
            ).where(NE.execution_id == source_id, NE.status == "completed"),
        )
    )


# Reading runs and nodes ------------------------------------------------------------------


async def lock_run(session: AsyncSession, execution_id: uuid.UUID) -> WorkflowExecution | None:
    return await session.get(EX, execution_id, with_for_update=True, populate_existing=True)


async def get_run(session: AsyncSession, execution_id: uuid.UUID) -> WorkflowExecution | None:
    return await session.get(EX, execution_id, populate_existing=True)


async def node_rows(session: AsyncSession, execution_id: uuid.UUID) -> Sequence[NodeExecution]:
    rows = await session.scalars(
        select(NE)
        .where(NE.execution_id == execution_id)
        .order_by(NE.started_at.nulls_last(), NE.node_id, NE.iteration)
    )
    return rows.all()


async def top_level_checkpoints(
    session: AsyncSession, execution_id: uuid.UUID
) -> Sequence[NodeExecution]:
    rows = await session.scalars(
        select(NE).where(NE.execution_id == execution_id, NE.iteration == 0)
    )
    return rows.all()


async def completed_body_nodes(
    session: AsyncSession, execution_id: uuid.UUID, parent: str
) -> Sequence[Any]:
    """(node_id, iteration, output, branch) of a loop body's completed passes."""
    rows = await session.execute(
        select(NE.node_id, NE.iteration, NE.output, NE.branch).where(
            NE.execution_id == execution_id,
            NE.node_id.startswith(parent + "."),
            NE.status == "completed",
        )
    )
    return rows.all()


def list_statement(
    workspace_id: uuid.UUID,
    *,
    workflow_id: uuid.UUID | None,
    status: str | None,
    since: datetime | None,
    until: datetime | None,
) -> Any:
    stmt = select(EX).where(EX.workspace_id == workspace_id)
    if workflow_id:
        stmt = stmt.where(EX.workflow_id == workflow_id)
    if status:
        stmt = stmt.where(EX.status == status)
    if since:
        stmt = stmt.where(EX.created_at >= since)
    if until:
        stmt = stmt.where(EX.created_at < until)
    return stmt.order_by(EX.created_at.desc(), EX.id)


async def unfinished_descendants(
    session: AsyncSession, execution_id: uuid.UUID
) -> Sequence[WorkflowExecution]:
    """Every unfinished run under this one (sub-runs, their sub-runs...), locked."""
    tree = select(EX.id).where(EX.parent_execution_id == execution_id).cte("tree", recursive=True)
    tree = tree.union_all(select(EX.id).where(EX.parent_execution_id == tree.c.id))
    rows = await session.scalars(
        select(EX)
        .where(EX.id.in_(select(tree.c.id)), EX.status.not_in(TERMINAL))
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return rows.all()


async def retrying_nodes(session: AsyncSession, execution_id: uuid.UUID) -> Sequence[Any]:
    rows = await session.execute(
        select(NE.node_id, NE.iteration).where(
            NE.execution_id == execution_id, NE.status == "retrying"
        )
    )
    return rows.all()


async def set_node_status(
    session: AsyncSession, execution_id: uuid.UUID, from_status: str, to: str
) -> None:
    await session.execute(
        update(NE)
        .where(NE.execution_id == execution_id, NE.status == from_status)
        .values(status=to, updated_at=func.now())
    )


# The reaper's scans ----------------------------------------------------------------------


async def expired_leases(session: AsyncSession, now: datetime) -> Sequence[WorkflowExecution]:
    rows = await session.scalars(
        select(EX)
        .where(EX.status == "running", EX.lease_expires_at < now)
        .limit(500)
        .with_for_update(skip_locked=True)
    )
    return rows.all()


async def unclaimed_pending(
    session: AsyncSession, now: datetime, older_than: datetime
) -> Sequence[WorkflowExecution]:
    rows = await session.scalars(
        select(EX)
        .where(
            EX.status == "pending",
            EX.updated_at < older_than,
            or_(EX.resume_at.is_(None), EX.resume_at <= now),
        )
        .limit(500)
        .with_for_update(skip_locked=True)
    )
    return rows.all()


async def database_now(session: AsyncSession) -> datetime:
    now: datetime | None = await session.scalar(select(func.now()))
    assert now is not None
    return now


# The engine's hot path -------------------------------------------------------------------

# The claim in one statement: a run nobody holds, not parked, not cancelled, under the
# delivery cap goes to `running` under this lease, and the change joins the history.
# `old` reads the status it had (UPDATE ... RETURNING only sees the new row).
CLAIM = text(
    """
WITH old AS (
  SELECT id, status FROM workflow_executions WHERE id = :execution_id FOR UPDATE
), claimed AS (
  UPDATE workflow_executions AS ex
  SET status = :to_status, deliveries = ex.deliveries + 1,
      started_at = coalesce(ex.started_at, :now), lease_owner = :token,
      lease_expires_at = :lease_until, resume_at = NULL, updated_at = now()
  FROM old
  WHERE ex.id = old.id
    AND ex.status IN ('pending', 'running')
    AND (ex.lease_owner IS NULL OR ex.lease_expires_at IS NULL OR ex.lease_expires_at <= :now)
    AND (ex.resume_at IS NULL OR ex.resume_at <= :now)
    AND ex.cancel_requested_at IS NULL
    AND ex.deliveries < :max_deliveries
  RETURNING ex.id, ex.workspace_id, ex.workflow_id, ex.version, ex.trigger_type,
            ex.trigger_data, ex.variables, ex.started_at, ex.depth, ex.retry_of,
            old.status AS from_status
), history AS (
  INSERT INTO execution_transitions
    (execution_id, iteration, from_status, to_status, reason, actor, at)
  SELECT id, 0, from_status, :to_status,
         CASE WHEN from_status = :to_status THEN 'lease taken over' ELSE 'claimed' END,
         :token, :now
  FROM claimed
)
SELECT * FROM claimed
"""
)


async def claim(conn: AsyncConnection, params: dict[str, Any]) -> Any:
    return (await conn.execute(CLAIM, params)).one_or_none()


# A checkpoint writes the node's whole state.
CHECKPOINT_DEFAULTS: dict[str, Any] = {
    "status": None,
    "branch": None,
    "attempt": 0,
    "input": None,
    "output": None,
    "error": None,
    "next_attempt_at": None,
    "started_at": None,
    "finished_at": None,
    "duration_ms": None,
    "input_tokens": 0,
    "output_tokens": 0,
    "cost_usd": 0.0,
}
_COLUMNS = ["id", "execution_id", "node_id", "iteration", *CHECKPOINT_DEFAULTS]
_TABLE = NE.__table__
# Fenced: the row is written only while this claim still holds the run's lease (the
# lease row is share-locked, so a reaper or a new claim cannot slip in between), and
# never over a node that already completed or was skipped. A zombie worker whose lease
# lapsed writes nothing.
LEASED = (
    select(EX.id)
    .where(EX.id == bindparam("execution_id"), EX.lease_owner == bindparam("lease"))
    .with_for_update(read=True)
)
_upsert = insert(NE).from_select(
    _COLUMNS,
    select(*[bindparam(c, type_=_TABLE.c[c].type) for c in _COLUMNS]).where(exists(LEASED)),
)
_written = (
    _upsert.on_conflict_do_update(
        constraint=NODE_KEY,
        set_={**{c: _upsert.excluded[c] for c in CHECKPOINT_DEFAULTS}, "updated_at": func.now()},
        # Literal SQL: an expanding IN list cannot be used with executemany (batched skips).
        where=text("node_executions.status NOT IN ('completed', 'skipped')"),
    )
    .returning(NE.execution_id, NE.node_id, NE.iteration, NE.status, NE.updated_at)
    .cte("written")
)
# The checkpoint and its history row in one statement; its row count is the number of
# checkpoints written (0: the lease is gone, or the node had already finished).
CHECKPOINT = insert(TR).from_select(
    ["execution_id", "node_id", "iteration", "from_status", "to_status", "reason", "actor", "at"],
    select(
        _written.c.execution_id,
        _written.c.node_id,
        _written.c.iteration,
        bindparam("from_status", type_=String(20)),
        _written.c.status,
        bindparam("reason", type_=String()),
        bindparam("lease", type_=String(200)),
        _written.c.updated_at,
    ),
)


async def write_checkpoints(conn: AsyncConnection, params: Any) -> int:
    result = await conn.execute(CHECKPOINT, params)
    return int(result.rowcount)


async def renew_leases(
    conn: AsyncConnection, ids: list[uuid.UUID], tokens: list[str], until: datetime
) -> list[uuid.UUID]:
    """Renew every lease this process holds in one statement; the ids still held."""
    rows = await conn.execute(
        text(
            "UPDATE workflow_executions AS ex SET lease_expires_at = :until "
            "FROM unnest(CAST(:ids AS uuid[]), CAST(:tokens AS text[])) AS held(id, token) "
            "WHERE ex.id = held.id AND ex.lease_owner = held.token RETURNING ex.id"
        ),
        {"ids": ids, "tokens": tokens, "until": until},
    )
    return [r[0] for r in rows]


async def look(conn: AsyncConnection, ids: list[uuid.UUID]) -> Sequence[Any]:
    """(id, lease_owner, cancel_requested_at) of the runs a process holds, in one query."""
    rows = await conn.execute(
        select(EX.id, EX.lease_owner, EX.cancel_requested_at).where(EX.id.in_(ids))
    )
    return rows.all()


async def release_lease(conn: AsyncConnection, execution_id: uuid.UUID, token: str) -> None:
    await conn.execute(
        update(EX)
        .where(EX.id == execution_id, EX.lease_owner == token)
        .values(lease_expires_at=func.now())
    )


def total(column: Any, execution_id: uuid.UUID, empty: Any) -> Any:
    return (
        select(func.coalesce(func.sum(column), empty))
        .where(NE.execution_id == execution_id)
        .scalar_subquery()
    )


async def cancel_retrying_fenced(
    session: AsyncSession, execution_id: uuid.UUID, token: str, to: str
) -> None:
    """Nodes waiting for a retry are cancelled with their run (lease holder only)."""
    await session.execute(
        update(NE)
        .where(
            NE.execution_id == execution_id,
            NE.status == "retrying",
            exists(LEASED.params(execution_id=execution_id, lease=token)),
        )
        .values(status=to, updated_at=func.now())
    )


async def close_fenced(
    session: AsyncSession,
    execution_id: uuid.UUID,
    token: str,
    to: str,
    values: dict[str, Any],
) -> WorkflowExecution | None:
    """Only the lease holder of a running run closes it (a worker that lost the lease
    changes nothing), with the node totals summed in the same statement."""
    return (
        await session.scalars(
            update(EX)
            .where(EX.id == execution_id, EX.lease_owner == token, EX.status == "running")
            .values(
                status=to,
                lease_owner=None,
                lease_expires_at=None,
                input_tokens=total(NE.input_tokens, execution_id, 0),
                output_tokens=total(NE.output_tokens, execution_id, 0),
                cost_usd=total(NE.cost_usd, execution_id, 0.0),
                **values,
            )
            .returning(EX),
            execution_options={"populate_existing": True},
        )
    ).one_or_none()
