"""Bodies of /executions."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from backend.auth.schemas import StrictInput


class ExecutionCreate(StrictInput):
    workflow_id: uuid.UUID
    trigger_type: Literal["manual", "schedule", "webhook", "event"] = "manual"
    trigger_data: dict[str, Any] = Field(default_factory=dict)


class BatchItem(StrictInput):
    trigger_data: dict[str, Any] = Field(default_factory=dict)


class ExecutionBatchCreate(StrictInput):
    workflow_id: uuid.UUID
    trigger_type: Literal["manual", "schedule", "webhook", "event"] = "manual"
    items: list[BatchItem] = Field(min_length=1, max_length=500)


class ExecutionBatchAccepted(BaseModel):
    workflow_id: uuid.UUID
    version: int
    # One id per item, in the order of the items.
    ids: list[uuid.UUID]


class ExecutionLinks(BaseModel):
    self: str
    nodes: str
    logs: str
    cancel: str


class ExecutionAccepted(BaseModel):
    id: uuid.UUID
    status: str
    workflow_id: uuid.UUID
    version: int
    links: ExecutionLinks


class NodeSummary(BaseModel):
    node_id: str
    status: str
    attempt: int
    duration_ms: float | None


class ExecutionRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    workspace_id: uuid.UUID
    workflow_id: uuid.UUID
    version: int
    status: str
    trigger_type: str
    trigger_data: dict[str, Any]
    output: dict[str, Any] | None
    error: dict[str, Any] | None
    retry_of: uuid.UUID | None
    parent_execution_id: uuid.UUID | None
    created_by: uuid.UUID | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: float | None
    input_tokens: int
    output_tokens: int
    cost_usd: float
    cancel_requested_at: datetime | None
    nodes: list[NodeSummary] = Field(default_factory=list)


class NodeExecutionRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    node_id: str
    iteration: int
    status: str
    branch: str | None
    attempt: int
    input: dict[str, Any] | None
    output: Any
    error: dict[str, Any] | None
    next_attempt_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: float | None
    input_tokens: int
    output_tokens: int
    cost_usd: float


class LogEntry(BaseModel):
    at: datetime | None
    level: Literal["info", "warning", "error"]
    node_id: str | None
    message: str


class TransitionRead(BaseModel):
    """One entry of a run's history: a status change of the run (`node_id` null) or of
    one of its nodes, who made it (`actor`) and why."""

    model_config = ConfigDict(from_attributes=True)

    at: datetime
    node_id: str | None
    iteration: int
    from_status: str | None
    to_status: str
    reason: str | None
    actor: str | None
