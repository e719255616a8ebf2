"""Request and response bodies of /auth and /api-keys. Inputs forbid unknown fields, so
nobody can slip in a role, an id or an owner (mass assignment answers 422)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, EmailStr, Field, HttpUrl, UrlConstraints

from backend.auth.permissions import Role

# Names go into mail subjects and logs: one line, no control characters.
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
AvatarUrl = Annotated[HttpUrl, UrlConstraints(max_length=2048, allowed_schemes=["https", "http"])]


class StrictInput(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class RequestOtp(StrictInput):
    email: EmailStr
    purpose: Literal["login", "signup"] = "login"


class RequestOtpResult(BaseModel):
    success: bool = True
    expires_in: int


class VerifyOtp(StrictInput):
    email: EmailStr
    code: str = Field(pattern=r"^\d{6}$")


class RefreshRequest(StrictInput):
    refresh_token: str = Field(min_length=10, max_length=4096)


class UserRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    email: str
    name: str | None
    avatar_url: str | None
    created_at: datetime


class UserUpdate(StrictInput):
    name: Name | None = None
    avatar_url: AvatarUrl | None = None


class TokenPair(BaseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth2 type name
    expires_in: int
    user: UserRead


class ApiKeyCreate(StrictInput):
    name: Annotated[Name, Field(max_length=100)]
    role: Role = Role.VIEWER
    expires_in_days: int | None = Field(default=None, ge=1, le=3650)


class ApiKeyRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    workspace_id: uuid.UUID
    name: str
    prefix: str
    role: Role
    created_by: uuid.UUID
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyRead):
    # The only time the key is ever shown.
    key: str
