"""Task and one-time link shapes."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from backend.workflows.graph import _json_schema_problem

TaskStatus = Literal["open", "approved", "rejected", "expired", "cancelled"]


class TaskRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    workspace_id: uuid.UUID
    kind: str
    status: str
    title: str
    message: str
    data: Any = None
    form: dict[str, Any] | None = None
    assignee_ids: list[uuid.UUID]
    min_role: str | None = None
    claimed_by: uuid.UUID | None = None
    claimed_at: datetime | None = None
    execution_id: uuid.UUID | None = None
    workflow_id: uuid.UUID | None = None
    node_id: str | None = None
    expires_at: datetime | None = None
    on_timeout: str
    decided_by: uuid.UUID | None = None
    decided_at: datetime | None = None
    decision: dict[str, Any] | None = None
    created_by: uuid.UUID | None = None
    created_at: datetime
    # Whether the caller may decide it (filled in per request).
    can_decide: bool = False


class TaskCreate(BaseModel):
    """A manual task: not tied to a run."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=500)
    message: str = Field(default="", max_length=20_000)
    data: Any = None
    form: dict[str, Any] | None = None
    assignees: list[uuid.UUID] = Field(default_factory=list, max_length=100)
    min_role: Literal["viewer", "editor", "administrator", "owner"] | None = None
    expires_in: int | None = Field(default=None, ge=1, le=366 * 86_400)
    on_timeout: Literal["reject", "approve"] = "reject"
    notify: bool = True

    @field_validator("form")
    @classmethod
    def _form(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            problem = _json_schema_problem(value)
            if problem:
                raise ValueError(problem)
        return value


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    comment: str | None = Field(default=None, max_length=10_000)
    input: Any = None


class LinkDecision(Decision):
    decision: Literal["approve", "reject"]


class ResumeAccepted(BaseModel):
    execution_id: uuid.UUID
    node_id: str
    status: Literal["resumed"] = "resumed"
