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
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from psycopg.rows import dict_row, namedtuple_row
from psycopg.types.json import Jsonb
from sqlalchemy import (
    func,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from backend.kit.db import driver_cursor
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


async def insert_runs(session: AsyncSession, rows: list[dict[str, Any]]) -> list[uuid.UUID]:
    """Many runs in one statement; the ids of those inserted (duplicates of a unique key
    are skipped)."""
    if not rows:
        return []
    result = await session.execute(
        insert(EX).values(rows).on_conflict_do_nothing().returning(EX.id)
    )
    return list(result.scalars())


async def find_by_keys(
    session: AsyncSession, workspace_id: uuid.UUID, keys: list[str]
) -> dict[str, tuple[uuid.UUID, uuid.UUID]]:
    """key -> (run id, workflow id) of the workspace's runs with those keys."""
    rows = await session.execute(
        select(EX.idempotency_key, EX.id, EX.workflow_id).where(
            EX.workspace_id == workspace_id, EX.idempotency_key.in_(keys)
        )
    )
    return {str(key): (run_id, workflow_id) for key, run_id, workflow_id in rows.all()}


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
# These statements run on the pooled connection's psycopg connection itself, as SQL
# written once: measured on a 3-node run, SQLAlchemy's statement building and result
# handling cost more CPU than the round trips (a run's CPU went from ~16 ms to ~9 ms),
# and a worker process is CPU-bound once it carries many runs. The casts are there
# because psycopg sends None and JSON without a type. Errors come back as SQLAlchemy's
# (db.driver_cursor), a dropped connection invalidated.


def _json(value: Any) -> Jsonb | None:
    return None if value is None else Jsonb(value)


# The claim in one statement: a run nobody holds, not parked, not cancelled, under the
# delivery cap goes to `running` under this lease, and the change joins the history.
# `old` reads the status it had (UPDATE ... RETURNING only sees the new row).
CLAIM = """
WITH old AS (
  SELECT id, status FROM workflow_executions WHERE id = %(execution_id)s FOR UPDATE
), claimed AS (
  UPDATE workflow_executions AS ex
  SET status = %(to_status)s, deliveries = ex.deliveries + 1,
      started_at = coalesce(ex.started_at, %(now)s), lease_owner = %(token)s,
      lease_expires_at = %(lease_until)s, resume_at = NULL, updated_at = now()
  FROM old
  WHERE ex.id = old.id
    AND ex.status IN ('pending', 'running')
    AND (ex.lease_owner IS NULL OR ex.lease_expires_at IS NULL
         OR ex.lease_expires_at <= %(now)s)
    AND (ex.resume_at IS NULL OR ex.resume_at <= %(now)s)
    AND ex.cancel_requested_at IS NULL
    AND ex.deliveries < %(max_deliveries)s
  RETURNING ex.id, ex.workspace_id, ex.workflow_id, ex.version, ex.trigger_type,
            ex.trigger_data, ex.variables, ex.started_at, ex.depth, ex.retry_of,
            old.status AS from_status
), history AS (
  INSERT INTO execution_transitions
    (execution_id, iteration, from_status, to_status, reason, actor, at)
  SELECT id, 0, from_status, %(to_status)s,
         CASE WHEN from_status = %(to_status)s THEN 'lease taken over' ELSE 'claimed' END,
         %(token)s, %(now)s
  FROM claimed
)
SELECT * FROM claimed
"""


async def claim(conn: AsyncConnection, params: dict[str, Any]) -> Any:
    async with driver_cursor(conn, namedtuple_row) as cur:
        await cur.execute(CLAIM, params)
        return await cur.fetchone()


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
_JSON_COLUMNS = ("input", "output", "error")
# Fenced: the row is written only while this claim still holds the run's lease (the
# lease row is share-locked for the statement, so a reaper or a new claim cannot slip
# in between), and never over a node that already completed or was skipped. A zombie
# worker whose lease lapsed writes nothing. The history row goes in the same statement;
# its row count is the number of checkpoints written (0: the lease is gone, or the node
# had already finished).
CHECKPOINT = """
WITH prev AS (
  SELECT status FROM node_executions
  WHERE execution_id = %(execution_id)s::uuid AND node_id = %(node_id)s::varchar
    AND iteration = %(iteration)s::int
), written AS (
  INSERT INTO node_executions
    (id, execution_id, node_id, iteration, status, branch, attempt, input, output, error,
     next_attempt_at, started_at, finished_at, duration_ms, input_tokens, output_tokens,
     cost_usd)
  SELECT %(id)s::uuid, %(execution_id)s::uuid, %(node_id)s::varchar, %(iteration)s::int,
         %(status)s::varchar, %(branch)s::varchar, %(attempt)s::int, %(input)s::jsonb,
         %(output)s::jsonb, %(error)s::jsonb, %(next_attempt_at)s::timestamptz,
         %(started_at)s::timestamptz, %(finished_at)s::timestamptz,
         %(duration_ms)s::float8, %(input_tokens)s::int, %(output_tokens)s::int,
         %(cost_usd)s::float8
  WHERE EXISTS (
    SELECT 1 FROM workflow_executions
    WHERE id = %(execution_id)s::uuid AND lease_owner = %(lease)s FOR SHARE
  )
  ON CONFLICT ON CONSTRAINT uq_node_executions_execution_id_node_id_iteration DO UPDATE
  SET status = excluded.status, branch = excluded.branch, attempt = excluded.attempt,
      input = excluded.input, output = excluded.output, error = excluded.error,
      next_attempt_at = excluded.next_attempt_at, started_at = excluded.started_at,
      finished_at = excluded.finished_at, duration_ms = excluded.duration_ms,
      input_tokens = excluded.input_tokens, output_tokens = excluded.output_tokens,
      cost_usd = excluded.cost_usd, updated_at = now()
  WHERE node_executions.status NOT IN ('completed', 'skipped')
  RETURNING execution_id, node_id, iteration, status, updated_at
)
INSERT INTO execution_transitions
  (execution_id, node_id, iteration, from_status, to_status, reason, actor, at)
SELECT execution_id, node_id, iteration,
       -- What the row held before (a node that never had one: the runner's view).
       coalesce((SELECT status FROM prev), %(from_status)s::varchar), status,
       %(reason)s::text, %(lease)s, updated_at
FROM written
"""


def _checkpoint_params(params: dict[str, Any]) -> dict[str, Any]:
    out = dict(params)
    for column in _JSON_COLUMNS:
        out[column] = _json(out[column])
    return out


async def write_checkpoints(conn: AsyncConnection, params: list[dict[str, Any]]) -> int:
    async with driver_cursor(conn) as cur:
        if len(params) == 1:
            await cur.execute(CHECKPOINT, _checkpoint_params(params[0]))
        else:
            await cur.executemany(CHECKPOINT, [_checkpoint_params(p) for p in params])
        return int(cur.rowcount)


# The close: only the lease holder of a running run closes it (a worker that lost the
# lease changes nothing), the node totals summed and the history row written in the
# same statement. It runs in the transaction the finished listeners write in.
CLOSE = """
WITH closed AS (
  UPDATE workflow_executions AS ex
  SET status = %(to_status)s, finished_at = %(now)s, duration_ms = %(duration_ms)s::float8,
      lease_owner = NULL, lease_expires_at = NULL,
      output = %(output)s::jsonb, error = %(error)s::jsonb,
      variables = coalesce(%(variables)s::jsonb, ex.variables),
      -- The run's totals in one pass over its node rows.
      (input_tokens, output_tokens, cost_usd) = (
        SELECT coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0),
               coalesce(sum(cost_usd), 0.0)
        FROM node_executions WHERE execution_id = ex.id),
      updated_at = now()
  WHERE ex.id = %(execution_id)s::uuid AND ex.lease_owner = %(token)s
    AND ex.status = 'running'
  RETURNING ex.*
), history AS (
  INSERT INTO execution_transitions
    (execution_id, iteration, from_status, to_status, reason, actor, at)
  SELECT id, 0, 'running', %(to_status)s, %(reason)s::text, %(token)s, %(now)s FROM closed
)
SELECT closed.*{facts} FROM closed
"""
# The statement per set of close facts (lifecycle.fact_at_close), built once.
_close_sql: dict[tuple[tuple[str, str], ...], str] = {}


def _close_statement(facts: Mapping[str, str]) -> str:
    key = tuple(sorted(facts.items()))
    sql = _close_sql.get(key)
    if sql is None:
        columns = "".join(f", ({expr}) AS fact_{name}" for name, expr in key)
        sql = _close_sql[key] = CLOSE.replace("{facts}", columns)
    return sql


async def close_fenced(
    session: AsyncSession,
    execution_id: uuid.UUID,
    token: str,
    to: str,
    *,
    now: datetime,
    duration_ms: float,
    reason: str | None,
    output: Any = None,
    error: Any = None,
    variables: Any = None,
    facts: Mapping[str, str] | None = None,
) -> tuple[WorkflowExecution | None, dict[str, Any]]:
    """The closed run as a detached row object (for its event and the listeners), and
    the values of `facts` (expressions over `closed`) computed in the same statement."""
    conn = await session.connection()
    params = {
        "execution_id": execution_id,
        "token": token,
        "to_status": to,
        "now": now,
        "duration_ms": duration_ms,
        "reason": reason,
        "output": _json(output),
        "error": _json(error),
        "variables": _json(variables),
    }
    async with driver_cursor(conn, dict_row) as cur:
        await cur.execute(_close_statement(facts or {}), params)
        row = await cur.fetchone()
    if row is None:
        return None, {}
    values = {name: row.pop(f"fact_{name}") for name in facts or {}}
    return WorkflowExecution(**row), values


async def renew_leases(
    conn: AsyncConnection, ids: list[uuid.UUID], tokens: list[str], until: datetime
) -> list[uuid.UUID]:
    """Renew every lease this process holds in one statement; the ids still held."""
    rows = await conn.execute(
        text(
            "UPDATE workflow_executions AS ex SET lease_expires_at = :until "
            "FROM unnest(CAST(:ids AS uuid[]), CAST(:tokens AS text[])) AS held(id, token) "
            "WHERE ex.id = held.id AND ex.lease_owner = held.token "
            # A lease handed back (expiring now) is not taken again by the heartbeat.
            "AND ex.lease_expires_at > now() RETURNING ex.id"
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


async def holds_lease(conn: AsyncConnection, execution_id: uuid.UUID, token: str) -> bool:
    found = await conn.scalar(select(EX.id).where(EX.id == execution_id, EX.lease_owner == token))
    return found is not None


async def release_lease(conn: AsyncConnection, execution_id: uuid.UUID, token: str) -> None:
    await conn.execute(
        update(EX)
        .where(EX.id == execution_id, EX.lease_owner == token)
        .values(lease_expires_at=func.now())
    )


async def end_retrying(
    session: AsyncSession,
    execution_id: uuid.UUID,
    to: str,
    reason: str,
    *,
    actor: str | None,
    fence: str | None = None,
) -> None:
    """Nodes waiting (for a retry, a person or a time) end with their run, each with its
    history row, in one statement. `fence`: only while that lease token holds the run
    (a worker closing it); None for a run nobody holds (the row is already locked by
    the caller)."""
    await session.execute(
        text(
            """
WITH old AS (
  SELECT id, status FROM node_executions
  WHERE execution_id = :execution_id AND status IN ('retrying', 'waiting')
  FOR UPDATE
), ended AS (
  UPDATE node_executions AS ne SET status = :to, updated_at = now()
  FROM old
  WHERE ne.id = old.id
    AND (CAST(:fence AS text) IS NULL
         OR EXISTS (SELECT 1 FROM workflow_executions
                    WHERE id = :execution_id AND lease_owner = :fence FOR SHARE))
  RETURNING ne.execution_id, ne.node_id, ne.iteration, ne.updated_at, old.status AS was
)
INSERT INTO execution_transitions
  (execution_id, node_id, iteration, from_status, to_status, reason, actor, at)
SELECT execution_id, node_id, iteration, was, :to, :reason, :actor, updated_at
FROM ended
"""
        ),
        {
            "execution_id": execution_id,
            "fence": fence,
            "to": to,
            "reason": reason,
            "actor": actor,
        },
    )
