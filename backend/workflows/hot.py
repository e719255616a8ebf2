"""The workflow reads a front end polls, as hot routes (backend/kit/hotpath.py): the
same statements, access rules and response models as GET /workflows and
GET /workflows/{id} in router.py, which answer whatever these leave to them."""

from __future__ import annotations

from typing import Any, get_args

from psycopg.rows import namedtuple_row
from pydantic import TypeAdapter

from backend.auth.permissions import Permission as P  # noqa: N817 - reads as a table
from backend.kit.hotpath import FallThrough, HotRequest, choice, int_value, route, uuid_value
from backend.kit.pagination import DEFAULT_LIMIT, MAX_DB_INT, MAX_LIMIT, Page
from backend.workflows import service
from backend.workflows.schemas import (
    TAG_MAX_LENGTH,
    Sort,
    Status,
    WorkflowRead,
    WorkflowSummary,
)

# As FastAPI serialises the routes' return values (by alias, to JSON bytes).
_READ = TypeAdapter(WorkflowRead)
_PAGE = TypeAdapter(Page[WorkflowSummary])

_LIST_PARAMETERS = frozenset({"limit", "offset", "status", "tag", "sort"})
_STATUSES = frozenset(get_args(Status))
_SORTS = frozenset(get_args(Sort))


async def read_workflow(request: HotRequest) -> bytes:
    workflow_id = uuid_value(request.params["workflow_id"])
    rows = await request.fetch(service.READ_STATEMENT, {"workflow_id": workflow_id}, namedtuple_row)
    if not rows:
        raise FallThrough  # the route answers the 404
    row = rows[0]
    request.grant(row.workspace_id, P.WORKFLOWS_READ)
    return _READ.dump_json(service.to_read(row, row.definition), by_alias=True)


async def list_workflows(request: HotRequest) -> bytes:
    query = request.query
    if not query.keys() <= _LIST_PARAMETERS:
        raise FallThrough  # a search (q=) goes through the ORM; others are ignored there
    limit = int_value(query.get("limit"), DEFAULT_LIMIT, 1, MAX_LIMIT)
    offset = int_value(query.get("offset"), 0, 0, MAX_DB_INT)
    status = choice(query.get("status"), _STATUSES)
    sort: Any = choice(query.get("sort"), _SORTS) or "-updated_at"
    tag = query.get("tag")
    if tag is not None and not 1 <= len(tag) <= TAG_MAX_LENGTH:
        raise FallThrough
    header = request.header(b"x-workspace-id")
    key = request.caller.principal.api_key
    if header is not None:
        workspace_id = uuid_value(header)
    elif key is not None:
        workspace_id = key["workspace_id"]
    else:
        raise FallThrough  # the route's 422 naming X-Workspace-ID
    request.grant(workspace_id, P.WORKFLOWS_READ)
    _, page = service.list_statements(bool(status), bool(tag), sort)
    values = {**service.list_filters(workspace_id, status, tag), "limit": limit, "offset": offset}
    rows = await request.fetch(page, values)
    if not rows and offset:
        raise FallThrough  # past the end: the total needs a count of its own
    total = int(rows[0]["total"]) if rows else 0
    return _PAGE.dump_json(
        Page(items=service.summaries(rows), total=total, limit=limit, offset=offset),
        by_alias=True,
    )


ROUTES = (
    route("/workflows", list_workflows),
    route("/workflows/{workflow_id}", read_workflow),
)
