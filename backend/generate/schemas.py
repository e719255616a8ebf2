"""Bodies of POST /workflows/generate and POST /workflows/{id}/generate."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

from backend.auth.schemas import Name, StrictInput
from backend.workflows.schemas import WorkflowRead

# Node types are checked against the live catalogue (a type added later is accepted).
NodeTypeName = str


class Constraints(StrictInput):
    node_types: list[NodeTypeName] | None = Field(default=None, min_length=1, max_length=50)
    max_nodes: int | None = Field(default=None, ge=2, le=500)


class _Common(StrictInput):
    constraints: Constraints = Field(default_factory=Constraints)
    # The workspace's agents and credentials the model may use, by id; unset: all of
    # them (names and types only, never a secret).
    agent_ids: list[uuid.UUID] | None = Field(default=None, max_length=100)
    credential_ids: list[uuid.UUID] | None = Field(default=None, max_length=100)
    # Save the result when it validates (a generated workflow is saved as a draft).
    save: bool = False
    # Answer as server-sent events: the model's progress, each round's problems, the result.
    stream: bool = False
    # A lower spend cap than GENERATE__MAX_COST_USD for this request.
    max_cost_usd: float | None = Field(default=None, ge=0, le=100, allow_inf_nan=False)


class GenerateRequest(_Common):
    prompt: str = Field(min_length=1, max_length=20_000)
    name: Name | None = None


class EditRequest(_Common):
    instruction: str = Field(min_length=1, max_length=20_000)
    # The version the instruction applies to; a save fails with 409 if the workflow
    # moved on meanwhile. Unset: the current version.
    version: int | None = Field(default=None, ge=1, le=2**31 - 1)


class ProblemRead(BaseModel):
    node_id: str | None
    field: str | None
    message: str


class UsageRead(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int


class NodeChange(BaseModel):
    id: str
    fields: list[str]


class Diff(BaseModel):
    nodes_added: list[str]
    nodes_removed: list[str]
    nodes_changed: list[NodeChange]
    connections_added: list[dict[str, Any]]
    connections_removed: list[dict[str, Any]]
    settings_changed: bool


class GenerateResult(BaseModel):
    name: str
    description: str
    definition: dict[str, Any]
    valid: bool
    problems: list[ProblemRead]
    # Deterministic repairs applied along the way, in order.
    repairs: list[str]
    # Model answers it took (1 = no repair round was needed).
    rounds: int
    stop_reason: Literal["valid", "max_rounds", "budget"]
    model: str
    usage: UsageRead
    # Estimated from the price table; null when the model is not in it.
    cost_usd: float | None
    notes: str
    saved: bool
    workflow: WorkflowRead | None = None


class EditResult(GenerateResult):
    base_version: int
    diff: Diff
