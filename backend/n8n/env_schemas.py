"""Bodies of /n8n environments, pipelines, snapshots and drift incidents."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from backend.auth.permissions import Role
from backend.auth.schemas import Name, StrictInput

Stage = Annotated[
    str,
    Field(
        min_length=1,
        max_length=50,
        pattern=r"^[a-z0-9][a-z0-9_-]*$",
        description="dev, staging, production, or a custom name (lower case, digits, - and _)",
    ),
]
DriftPolicy = Literal["notify", "accept", "restore"]
Clock = Annotated[str, Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="HH:MM, 24 h")]
Note = Annotated[str, Field(max_length=2000, pattern=r"^[^\x00]*$")]


class Approvals(StrictInput):
    """Who must approve a promotion into the environment: `min_approvals` people, each
    one of `approver_ids` or of role `approver_min_role` or higher (either list may be
    empty; both empty with min_approvals > 0 means any administrator or owner)."""

    min_approvals: int = Field(default=0, ge=0, le=10)
    approver_ids: list[uuid.UUID] = Field(default_factory=list, max_length=50)
    approver_min_role: Role | None = None

    @field_validator("approver_ids")
    @classmethod
    def _unique(cls, value: list[uuid.UUID]) -> list[uuid.UUID]:
        return list(dict.fromkeys(value))


class AllowedHours(StrictInput):
    """When changes may land: on `days` (0 = Monday), from `start` to `end` in
    `timezone` (an IANA name). `end` before `start` is a window across midnight."""

    timezone: str = Field(max_length=64)
    days: list[Annotated[int, Field(ge=0, le=6)]] = Field(
        default_factory=lambda: list(range(7)), min_length=1, max_length=7
    )
    start: Clock
    end: Clock

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        # The pattern keeps a name from walking the zoneinfo directory.
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+)*", value):
            raise ValueError("must be an IANA time zone name, e.g. Europe/Berlin")
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
            raise ValueError("must be an IANA time zone name, e.g. Europe/Berlin") from exc
        return value

    @field_validator("days")
    @classmethod
    def _days(cls, value: list[int]) -> list[int]:
        return sorted(set(value))

    @model_validator(mode="after")
    def _span(self) -> AllowedHours:
        if self.start == self.end:
            raise ValueError("start and end must differ (omit allowed_hours for always)")
        return self


class EnvironmentCreate(StrictInput):
    instance_id: uuid.UUID
    stage: Stage
    protected: bool = False
    approvals: Approvals = Field(default_factory=Approvals)
    allowed_hours: AllowedHours | None = None
    drift_policy: DriftPolicy = "notify"


class EnvironmentPatch(StrictInput):
    stage: Stage | None = None
    protected: bool | None = None
    approvals: Approvals | None = None
    # null clears the window (changes allowed at any time).
    allowed_hours: AllowedHours | None = None
    drift_policy: DriftPolicy | None = None


class EnvironmentRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    workspace_id: uuid.UUID
    instance_id: uuid.UUID
    instance_name: str = ""
    stage: str
    protected: bool
    approvals: dict[str, Any]
    allowed_hours: dict[str, Any] | None
    drift_policy: str
    drift_checked_at: datetime | None
    baseline_adopted_at: datetime | None
    open_incidents: int = 0
    created_by: uuid.UUID | None
    created_at: datetime
    updated_at: datetime

    @field_validator("allowed_hours", mode="before")
    @classmethod
    def _empty(cls, value: Any) -> Any:
        return value or None


class PipelineCreate(StrictInput):
    name: Annotated[Name, Field(max_length=100)]
    description: Annotated[str, Field(max_length=2000, pattern=r"^[^\x00]*$")] = ""
    environment_ids: list[uuid.UUID] = Field(min_length=1, max_length=20)


class PipelinePatch(StrictInput):
    name: Annotated[Name, Field(max_length=100)] | None = None
    description: Annotated[str, Field(max_length=2000, pattern=r"^[^\x00]*$")] | None = None
    environment_ids: list[uuid.UUID] | None = Field(default=None, min_length=1, max_length=20)


class PipelineStage(BaseModel):
    environment_id: uuid.UUID
    stage: str
    instance_id: uuid.UUID
    instance_name: str
    protected: bool


class PipelineRead(BaseModel):
    id: uuid.UUID
    workspace_id: uuid.UUID
    name: str
    description: str
    environment_ids: list[uuid.UUID]
    stages: list[PipelineStage]
    created_by: uuid.UUID | None
    created_at: datetime
    updated_at: datetime


class SnapshotCreate(StrictInput):
    note: Note | None = None


class SnapshotRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    workspace_id: uuid.UUID
    instance_id: uuid.UUID
    n8n_workflow_id: str
    name: str
    active: bool
    digest: str
    reason: str
    note: str | None
    by_user_id: uuid.UUID | None
    n8n_version_id: str | None
    node_count: int
    created_at: datetime


class SnapshotDetail(SnapshotRead):
    # {name, nodes: {name: node}, connections, settings}: what the digest is over.
    definition: dict[str, Any]


class SnapshotDiff(BaseModel):
    from_id: uuid.UUID
    to_id: uuid.UUID
    same: bool
    changes: list[dict[str, Any]]


class RestoreRequest(StrictInput):
    note: Note | None = None


class RestoreResult(BaseModel):
    restored: SnapshotRead
    # The definition as it was just before (snapshotted first) and as n8n has it after.
    before: SnapshotRead | None
    after: SnapshotRead
    n8n_workflow_id: str
    active: bool


class IncidentRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    workspace_id: uuid.UUID
    environment_id: uuid.UUID
    instance_id: uuid.UUID
    n8n_workflow_id: str
    name: str
    kind: str
    status: str
    baseline_snapshot_id: uuid.UUID | None
    current_snapshot_id: uuid.UUID | None
    current_digest: str | None
    diff: list[dict[str, Any]]
    detections: int
    last_seen_at: datetime | None
    acknowledged_by: uuid.UUID | None
    acknowledged_at: datetime | None
    resolved_by: uuid.UUID | None
    resolved_at: datetime | None
    resolution: str | None
    created_at: datetime
    updated_at: datetime


IncidentStatus = Literal["open", "acknowledged", "accepted", "reverted", "resolved"]


class IncidentAction(StrictInput):
    note: Note | None = None


class DriftCheckResult(BaseModel):
    ok: bool
    reason: str | None = None
    adopted: int = 0
    in_sync: int = 0
    opened: int = 0
    updated: int = 0
    accepted: int = 0
    reverted: int = 0
    resolved: int = 0


class ReportRow(BaseModel):
    n8n_workflow_id: str
    name: str
    state: Literal["in_sync", "drifted", "untracked"]
    baseline_snapshot_id: uuid.UUID | None
    baseline_digest: str | None
    incident_id: uuid.UUID | None
    incident_kind: str | None


class DriftReport(BaseModel):
    environment: EnvironmentRead
    checked_at: datetime | None
    workflows: list[ReportRow]
    open_incidents: int
    by_kind: dict[str, int]
    resolved_last_30_days: dict[str, int]
