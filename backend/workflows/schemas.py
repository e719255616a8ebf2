"""Bodies of /workflows."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from backend.auth.schemas import Name, StrictInput

Status = Literal["draft", "published", "archived"]
# The longest tag: a stored one, and a list filter by tag (the route and its hot read).
TAG_MAX_LENGTH = 50
Tag = Annotated[str, Field(min_length=1, max_length=TAG_MAX_LENGTH, pattern=r"^[^,\s][^,]*$")]
Sort = Literal["updated_at", "-updated_at", "created_at", "-created_at", "name", "-name"]


class DefinitionParts(StrictInput):
    nodes: list[dict[str, Any]] | None = None
    connections: list[dict[str, Any]] | None = None
    settings: dict[str, Any] | None = None


class WorkflowCreate(DefinitionParts):
    name: Name
    description: str = Field(default="", max_length=5000)
    tags: list[Tag] = Field(default_factory=list, max_length=20)


class WorkflowUpdate(DefinitionParts):
    name: Name | None = None
    description: str | None = Field(default=None, max_length=5000)
    tags: list[Tag] | None = Field(default=None, max_length=20)
    # The version the client edited; an older one means someone saved in between.
    version: int | None = Field(default=None, ge=1, le=2**31 - 1)


class StatusChange(StrictInput):
    status: Status


class WorkflowSummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    workspace_id: uuid.UUID
    name: str
    description: str
    status: Status
    tags: list[str]
    version: int = Field(validation_alias="current_version")
    created_by: uuid.UUID | None
    created_at: datetime
    updated_at: datetime


class WorkflowRead(WorkflowSummary):
    nodes: list[dict[str, Any]]
    connections: list[dict[str, Any]]
    settings: dict[str, Any]


class VersionSummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    number: int
    created_by: uuid.UUID | None
    created_at: datetime


class VersionRead(VersionSummary):
    definition: dict[str, Any]


class ExportDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["orchestration-studio.workflow"] = "orchestration-studio.workflow"
    format_version: Literal[1] = 1
    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=5000)
    tags: list[Tag] = Field(default_factory=list, max_length=20)
    definition: dict[str, Any]
    # What the definition refers to outside itself, for the importer to map.
    references: dict[str, list[uuid.UUID]] = Field(default_factory=dict)
    source_workflow_id: uuid.UUID | None = None
    source_version: int | None = Field(default=None, ge=1, le=2**31 - 1)
    exported_at: datetime | None = None


class ImportRequest(StrictInput):
    document: ExportDocument
    # Old id -> id in this workspace, for agents, credentials, sub-workflows and MCP
    # servers the definition names; unmapped references must exist here already.
    id_map: dict[uuid.UUID, uuid.UUID] = Field(default_factory=dict)
    name: str | None = Field(default=None, min_length=1, max_length=200)
