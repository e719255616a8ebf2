"""Bodies of /workflows/{id}/triggers, /workflows/{id}/notifications and /hooks."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class TriggerRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    workflow_id: uuid.UUID
    node_id: str
    kind: str
    config: dict[str, Any]
    enabled: bool
    # Follows the workflow: only a published workflow's triggers fire.
    active: bool
    next_run_at: datetime | None
    last_fired_at: datetime | None
    source_workflow_id: uuid.UUID | None
    # Webhooks: where to send, and whether a signing secret is set (never the secret).
    webhook_url: str | None = None
    has_secret: bool = False
    next_fire_times: list[datetime] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime


class SecretCreated(BaseModel):
    """Shown once: only a sealed copy is stored."""

    secret: str
    header_names: list[str]


class NotificationRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    execution_id: uuid.UUID
    event: str
    channel: str
    target: str
    status: str
    attempts: int
    last_error: str | None
    sent_at: datetime | None
    created_at: datetime


class HookAccepted(BaseModel):
    execution_id: uuid.UUID
    status: str
    links: dict[str, str]


class HookFinished(BaseModel):
    execution_id: uuid.UUID
    status: str
    output: dict[str, Any] | None
    error: dict[str, Any] | None
