"""The shapes n8n's public API v1 answers with, as typed dictionaries, named and spelled
as in the OpenAPI spec n8n ships (`dist/public-api/v1/openapi.yml` in the npm package;
the part we use is kept in tests/n8n/n8n-openapi-2.41.1.json, and a test checks that
every key here is a property there). Only what we read is declared: n8n adds fields
freely, and a field missing on an older version is simply absent (total=False)."""

from __future__ import annotations

from typing import Any, Literal, TypedDict

# GET /executions?status= and every execution's `status`.
ExecutionStatus = Literal[
    "canceled", "crashed", "error", "new", "running", "success", "unknown", "waiting"
]
EXECUTION_STATUSES: tuple[str, ...] = (
    "canceled", "crashed", "error", "new", "running", "success", "unknown", "waiting"
)  # fmt: skip
FAILED_STATUSES = frozenset({"error", "crashed"})
UNFINISHED_STATUSES = frozenset({"new", "running", "waiting", "unknown"})


class Tag(TypedDict, total=False):
    id: str
    name: str
    createdAt: str
    updatedAt: str


class Node(TypedDict, total=False):
    id: str
    name: str
    type: str
    typeVersion: float
    position: list[float]
    parameters: dict[str, Any]
    disabled: bool
    webhookId: str
    credentials: dict[str, Any]


class WorkflowSettings(TypedDict, total=False):
    errorWorkflow: str
    executionOrder: str
    timezone: str
    saveDataErrorExecution: str
    saveDataSuccessExecution: str
    callerPolicy: str


class Workflow(TypedDict, total=False):
    id: str
    name: str
    active: bool
    isArchived: bool
    createdAt: str
    updatedAt: str
    versionId: str
    activeVersionId: str | None
    triggerCount: float
    nodes: list[Node]
    connections: dict[str, Any]
    settings: WorkflowSettings | None
    tags: list[Tag]


class WorkflowList(TypedDict, total=False):
    data: list[Workflow]
    nextCursor: str | None


class Execution(TypedDict, total=False):
    id: str
    finished: bool
    mode: str
    retryOf: str | None
    retrySuccessId: str | None
    status: ExecutionStatus
    startedAt: str | None
    stoppedAt: str | None
    workflowId: str
    waitTill: str | None
    # With includeData=true: {resultData: {error: {message, node: {name}}, lastNodeExecuted}}.
    data: dict[str, Any]


class ExecutionList(TypedDict, total=False):
    data: list[Execution]
    nextCursor: str | None


class TagList(TypedDict, total=False):
    data: list[Tag]
    nextCursor: str | None


class Credential(TypedDict, total=False):
    """GET /credentials (owner/admin keys with credential:list; never the secrets)."""

    id: str
    name: str
    type: str
    createdAt: str
    updatedAt: str


class CredentialList(TypedDict, total=False):
    data: list[Credential]
    nextCursor: str | None


class WorkflowCreate(TypedDict, total=False):
    """POST /workflows and PUT /workflows/{id}: these four are required (the spec refuses
    other, read-only keys with additionalProperties: false)."""

    name: str
    nodes: list[Node]
    connections: dict[str, Any]
    settings: dict[str, Any]


class RetryBody(TypedDict, total=False):
    loadWorkflow: bool
