"""Bodies of /workspaces, members, invitations and activity."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, EmailStr, Field

from backend.auth.permissions import Role
from backend.auth.schemas import Name, StrictInput


class WorkspaceCreate(StrictInput):
    name: Name
    settings: dict[str, Any] = Field(default_factory=dict)


class WorkspaceUpdate(StrictInput):
    name: Name | None = None
    settings: dict[str, Any] | None = None


class WorkspaceRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    slug: str
    settings: dict[str, Any]
    is_personal: bool
    created_at: datetime
    updated_at: datetime


class WorkspaceWithRole(WorkspaceRead):
    role: Role


class MemberRead(BaseModel):
    user_id: uuid.UUID
    email: str
    name: str | None
    role: Role
    joined_at: datetime


class MemberUpdate(StrictInput):
    role: Role


class InviteCreate(StrictInput):
    email: EmailStr
    role: Role = Role.EDITOR


class InvitationRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    workspace_id: uuid.UUID
    email: str
    role: Role
    expires_at: datetime
    accepted_at: datetime | None
    created_at: datetime


class InvitationForMe(InvitationRead):
    workspace_name: str


class ActivityRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    created_at: datetime
    workspace_id: uuid.UUID | None
    user_id: uuid.UUID | None
    api_key_id: uuid.UUID | None
    action: str
    resource_type: str
    resource_id: str | None
    ip: str | None
    user_agent: str | None
    details: dict[str, Any]
