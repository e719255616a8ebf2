"""Bodies of /workflows/{id}/suggestions."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from backend.auth.schemas import StrictInput
from backend.generate.schemas import Diff, ProblemRead, UsageRead
from backend.workflows.schemas import WorkflowRead

Status = Literal["open", "accepted", "dismissed"]
Source = Literal["history", "model"]


class SuggestionRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    workflow_id: uuid.UUID
    kind: str
    # history: the run-history rules; model: POST .../suggestions/generate.
    source: Source
    reason: str
    # The figures behind the reason (history), or the model's notes.
    evidence: dict[str, Any]
    # Operations on the definition of `base_version` (see the README).
    patch: list[dict[str, Any]]
    base_version: int
    status: Status
    # The workflow moved past base_version: accepting answers 409 until a recompute
    # (beat, or POST .../suggestions/refresh) brings the suggestion up to date.
    stale: bool = False
    # What accepting would change, against base_version.
    diff: Diff | None = None
    decided_by: uuid.UUID | None
    decided_at: datetime | None
    created_at: datetime
    updated_at: datetime


class RefreshResult(BaseModel):
    added: int
    refreshed: int
    resolved: int
    # The open suggestions after the recompute.
    items: list[SuggestionRead]


class AcceptResult(BaseModel):
    suggestion: SuggestionRead
    # The workflow at the version the patch created.
    workflow: WorkflowRead


class GenerateSuggestions(StrictInput):
    # What to look at ("make it cheaper", "why does fetch fail?"); unset: anything.
    instruction: str | None = Field(default=None, min_length=1, max_length=4000)
    # A lower spend cap than GENERATE__MAX_COST_USD for this request.
    max_cost_usd: float | None = Field(default=None, ge=0, le=100, allow_inf_nan=False)


class Rejected(BaseModel):
    """A suggestion the model made whose patch did not apply or validate."""

    kind: str
    reason: str
    problems: list[ProblemRead]


class GenerateSuggestionsResult(BaseModel):
    # Stored (open) suggestions; one the workflow already had comes back as it is.
    items: list[SuggestionRead]
    rejected: list[Rejected]
    rounds: int
    model: str
    usage: UsageRead
    cost_usd: float | None
