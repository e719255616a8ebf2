"""A new run's row and its first history entry in one statement (issue 20).

`lifecycle.create_run` admits every run (API, retry, rerun, schedules, webhooks, events,
sub-runs). Through the ORM that was two statements, each paying SQLAlchemy's
execution pipeline (an INSERT ... RETURNING built and compiled per call, ORM result
processing, ~1 ms of CPU together on `POST /executions`). Here it is one data-modifying
CTE sent straight through psycopg on the unit of work's connection (same transaction):
the run is inserted (with `ON CONFLICT DO NOTHING` when a unique key may already have
its run) and, only if it was, its `pending` history row with it. The returned row
becomes the session's persistent `WorkflowExecution` without a query.
"""

from __future__ import annotations

import enum
import functools
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import JSON, inspect
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import make_transient_to_detached

from backend.kit import rawsql
from backend.models import ExecutionTransition, WorkflowExecution

_RUNS = WorkflowExecution.__tablename__
_TRANSITIONS = ExecutionTransition.__tablename__
_COLUMNS = frozenset(c.name for c in WorkflowExecution.__table__.columns)
# Column name -> mapped attribute, for the RETURNING row: a column the model does not
# map (a migration ahead of the code) is left out instead of failing the constructor.
_ATTRIBUTES = {
    attr.columns[0].name: attr.key
    for attr in inspect(WorkflowExecution).column_attrs
    if len(attr.columns) == 1
}
# JSON columns: psycopg sends a dict or list as JSON only when told to.
_JSON_COLUMNS = frozenset(
    c.name for c in WorkflowExecution.__table__.columns if isinstance(c.type, JSON)
)


@functools.cache
def _statement(columns: tuple[str, ...], skip_duplicate: bool) -> str:
    """The CTE for one set of columns (a handful of shapes: API runs, retries, schedule
    slots, sub-runs), built once. Names come from the table, never from input."""
    unknown = set(columns) - _COLUMNS
    if unknown:
        raise ValueError(f"not columns of {_RUNS}: {sorted(unknown)}")
    names = ", ".join(columns)
    values = ", ".join(f"%(c_{name})s" for name in columns)
    conflict = " ON CONFLICT DO NOTHING" if skip_duplicate else ""
    # Identifiers from the table's own metadata (checked above); values are parameters.
    return (
        f"WITH run AS (INSERT INTO {_RUNS} ({names}) VALUES ({values}){conflict}"  # noqa: S608
        " RETURNING *),"
        f" history AS (INSERT INTO {_TRANSITIONS}"
        " (execution_id, node_id, iteration, from_status, to_status, reason, actor, at)"
        " SELECT id, NULL, 0, NULL, %(h_to)s, %(h_reason)s, %(h_actor)s, %(h_at)s FROM run)"
        " SELECT * FROM run"
    )


def _param(name: str, value: Any) -> Any:
    if isinstance(value, enum.Enum):
        # psycopg would send an Enum's name; the column holds its value.
        return value.value
    if name in _JSON_COLUMNS and value is not None:
        return Jsonb(value)
    return value


async def insert_run(
    session: AsyncSession,
    values: dict[str, Any],
    *,
    skip_duplicate: bool,
    status: str,
    at: datetime,
    actor: str | None,
    reason: str | None,
) -> WorkflowExecution | None:
    """Insert the run (`values`: its columns, `id` included) and its first history row
    (None -> `status`); the run as a persistent object of `session`, or None when
    `skip_duplicate` and a unique key already has its run (then nothing was written)."""
    columns = tuple(sorted(values))
    params = {f"c_{name}": _param(name, value) for name, value in values.items()}
    params.update(h_to=status, h_reason=reason, h_actor=actor, h_at=at)
    rows = await rawsql.fetch_sql(session, _statement(columns, skip_duplicate), params)
    if not rows:
        return None
    execution = WorkflowExecution(
        **{_ATTRIBUTES[name]: value for name, value in rows[0].items() if name in _ATTRIBUTES}
    )
    make_transient_to_detached(execution)
    session.add(execution)
    return execution
