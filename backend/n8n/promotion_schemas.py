"""Bodies of /n8n/promotions and /n8n/deployments."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from backend.auth.schemas import StrictInput
from backend.n8n.schemas import N8nId

PromotionStatus = Literal[
    "awaiting_approval", "approved", "rejected", "blocked", "executing", "deployed",
    "rolled_back", "failed",
]  # fmt: skip


class SourceWorkflow(StrictInput):
    instance_id: uuid.UUID
    n8n_workflow_id: N8nId


class PromotionCreate(StrictInput):
    workflow: SourceWorkflow
    from_env: uuid.UUID = Field(description="the source environment's id")
    to_env: uuid.UUID = Field(description="the target environment's id (next in a pipeline)")
    min_success_rate: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="percent of the source's last finished runs (as synced) that must have "
        "succeeded; default 90; 0 turns the gate off",
    )
    target_workflow_id: N8nId | None = Field(
        default=None,
        description="update this existing workflow of the target (adopting it into the "
        "lineage) instead of finding it by lineage or marker",
    )
    note: Annotated[str, Field(max_length=2000)] | None = None


class PromotionDecision(StrictInput):
    comment: Annotated[str, Field(max_length=10_000)] | None = None


class DeploymentRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    promotion_id: uuid.UUID
    environment_id: uuid.UUID
    from_env_id: uuid.UUID | None
    instance_id: uuid.UUID
    lineage_id: uuid.UUID
    n8n_workflow_id: str | None
    name: str
    action: str
    status: str
    steps: list[dict[str, Any]]
    pre_snapshot_id: uuid.UUID | None
    snapshot_id: uuid.UUID | None
    digest: str
    error: str | None
    rolled_back: bool
    by_user_id: uuid.UUID | None
    created_at: datetime


class PromotionRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    lineage_id: uuid.UUID
    from_env_id: uuid.UUID
    to_env_id: uuid.UUID
    source_instance_id: uuid.UUID
    source_workflow_id: str
    source_active: bool
    target_instance_id: uuid.UUID
    target_workflow_id: str | None
    action: str
    matched_by: str
    name: str
    status: str
    plan: dict[str, Any] = Field(
        description="credentials {source, mapped, missing}, diff, gates, target_digest"
    )
    digest: str
    min_success_rate: float | None
    task_ids: list[str]
    requested_by: uuid.UUID | None
    approved_by: list[str]
    rejected_by: uuid.UUID | None
    decision_comment: str | None
    executed_by: uuid.UUID | None
    executed_at: datetime | None
    deployment_id: uuid.UUID | None
    created_at: datetime
    deployment: DeploymentRead | None = None
