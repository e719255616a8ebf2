"""Bodies of /templates."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

from backend.auth.schemas import Name, StrictInput


class ParameterRead(BaseModel):
    name: str
    kind: str
    description: str
    required: bool
    default: Any = None


class TemplateSummary(BaseModel):
    id: str
    source: Literal["builtin", "workspace"]
    name: str
    description: str
    category: str
    parameters: list[ParameterRead]
    preview: dict[str, Any]


class TemplateRead(TemplateSummary):
    definition: dict[str, Any]


class TemplateList(BaseModel):
    items: list[TemplateSummary]
    total: int


class Instantiate(StrictInput):
    # Parameter values: agent and credential ids of this workspace, or text.
    parameters: dict[str, str | int | float | bool] = Field(default_factory=dict, max_length=50)
    name: Name | None = None


class Publish(StrictInput):
    workflow_id: uuid.UUID
    name: Name | None = None
    description: str | None = Field(default=None, max_length=5000)
    category: str = Field(default="custom", min_length=1, max_length=50, pattern=r"^[a-z0-9_-]+$")
