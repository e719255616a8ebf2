"""A new run's row and its first history entry in one statement (issue 20).

`lifecycle.create_run` admits every run (API, retry, rerun, schedules, webhooks, events,
sub-runs). Through the ORM that was two statements, each paying SQLAlchemy's
execution pipeline (an INSERT ... RETURNING built and compiled per call, ORM result
processing, ~1 ms of CPU together on `POST /executions`). Here it is one data-modifying
CTE sent straight through psycopg on the unit of work's connection (same transaction):
the run is inserted (with `ON CONFLICT DO NOTHING` when a unique key may already have
its run) and, only if it was, its `pending` history row with it, and, when the caller
passes one, its activity-log entry (`POST /executions`: no ORM flush of an
`ActivityLog` at the commit). The returned row becomes the session's persistent
`WorkflowExecution` without a query.
"""

from __future__ import annotations

import enum
import functools
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import JSON, inspect
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import make_transient_to_detached

from backend.kit import rawsql
from backend.models import ActivityLog, ExecutionTransition, WorkflowExecution

_RUNS = WorkflowExecution.__tablename__
_TRANSITIONS = ExecutionTransition.__tablename__
_ACTIVITY = ActivityLog.__tablename__
# An activity entry's columns as activity.service.entry_values gives them; `id` is
# ours, `resource_id` the run's, `created_at` the table's default (clock_timestamp).
_ACTIVITY_COLUMNS = (
    "workspace_id",
    "user_id",
    "api_key_id",
    "action",
    "resource_type",
    "ip",
    "user_agent",
    "details",
)
_COLUMNS = frozenset(c.name for c in WorkflowExecution.__table__.columns)
# Column name -> mapped attribute, for the RETURNING row: a column the model does not
# map (a migration ahead of the code) is left out instead of failing the constructor.
_ATTRIBUTES = {
    attr.columns[0].name: attr.key
    for attr in inspect(WorkflowExecution).column_attrs
    if len(attr.columns) == 1
}
_MANAGER = inspect(WorkflowExecution).class_manager
# JSON columns: psycopg sends a dict or list as JSON only when told to.
_JSON_COLUMNS = frozenset(
    c.name for c in WorkflowExecution.__table__.columns if isinstance(c.type, JSON)
)


@functools.cache
def _statement(columns: tuple[str, ...], skip_duplicate: bool, with_activity: bool) -> str:
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
        + (_ACTIVITY_CTE if with_activity else "")
        + " SELECT * FROM run"
    )


# Like the history row, written only if the run was (FROM run); the run's id as text
# is what str(uuid) gives, as `record` stores it.
_ACTIVITY_CTE = (
    f", activity AS (INSERT INTO {_ACTIVITY} (id, resource_id, "  # noqa: S608
    + ", ".join(_ACTIVITY_COLUMNS)
    + ") SELECT %(a_id)s, id::text, "
    + ", ".join(f"%(a_{name})s" for name in _ACTIVITY_COLUMNS)
    + " FROM run)"
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
    activity: Mapping[str, Any] | None = None,
) -> WorkflowExecution | None:
    """Insert the run (`values`: its columns, `id` included), its first history row
    (None -> `status`) and, if given, its activity entry (`activity`: the columns of
    activity.service.entry_values; its `resource_id` is the run's id); the run as a
    persistent object of `session`, or None when `skip_duplicate` and a unique key
    already has its run (then nothing was written)."""
    columns = tuple(sorted(values))
    params = {f"c_{name}": _param(name, value) for name, value in values.items()}
    params.update(h_to=status, h_reason=reason, h_actor=actor, h_at=at)
    if activity is not None:
        params["a_id"] = uuid.uuid4()
        for name in _ACTIVITY_COLUMNS:
            value = activity[name]
            params[f"a_{name}"] = Jsonb(value) if name == "details" else value
    statement = _statement(columns, skip_duplicate, activity is not None)
    rows = await rawsql.fetch_sql(session, statement, params)
    if not rows:
        return None
    # Built as the ORM builds a row it loads: the instance with its state, the values put
    # in its dict, no constructor (which sets each attribute through the instrumentation's
    # events, ~30 us of CPU here; the model has no validators or init listeners), then
    # marked as persistent with these values committed.
    execution: WorkflowExecution = _MANAGER.new_instance()
    execution.__dict__.update(
        (_ATTRIBUTES[name], value) for name, value in rows[0].items() if name in _ATTRIBUTES
    )
    make_transient_to_detached(execution)
    session.add(execution)
    return execution
