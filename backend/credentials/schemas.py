"""Bodies of /credentials. Secrets go in; only metadata ever comes out."""

from __future__ import annotations

import base64
import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, field_validator

from backend.auth.schemas import Name, StrictInput
from backend.kit.bodies import is_header_value

HeaderName = Annotated[str, Field(pattern=r"^[A-Za-z0-9-]{1,64}$")]


def _header_value(value: SecretStr) -> SecretStr:
    if not is_header_value(value.get_secret_value()):
        # The message never repeats the value.
        raise ValueError("must be ASCII without control characters (CR, LF, ...)")
    return value


HeaderValue = Annotated[SecretStr, AfterValidator(_header_value)]


class ApiKeySecret(StrictInput):
    type: Literal["api_key"]
    key: HeaderValue = Field(min_length=1, max_length=4096)
    header: HeaderName = "X-API-Key"


class BearerSecret(StrictInput):
    type: Literal["bearer"]
    token: HeaderValue = Field(min_length=1, max_length=8192)


class BasicSecret(StrictInput):
    type: Literal["basic"]
    username: str = Field(min_length=1, max_length=256)
    password: SecretStr = Field(min_length=1, max_length=1024)


class HeadersSecret(StrictInput):
    type: Literal["headers"]
    headers: dict[HeaderName, HeaderValue] = Field(min_length=1, max_length=20)


class WebhookSecret(StrictInput):
    """The signing secret of outgoing webhooks (notify nodes), Standard Webhooks style:
    `whsec_<base64>` as their libraries print it, or any long random string."""

    type: Literal["webhook_secret"]
    secret: SecretStr = Field(min_length=16, max_length=1024)

    @field_validator("secret")
    @classmethod
    def _decodable(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        if raw.startswith("whsec_"):
            try:
                base64.b64decode(raw.removeprefix("whsec_"), validate=True)
            except ValueError:
                raise ValueError("a whsec_ secret must be base64 after the prefix") from None
        return value


class PostgresSecret(StrictInput):
    """A PostgreSQL database for `database` nodes; every part is kept encrypted. The
    host is checked like any outbound address (private ones need
    HTTP__ALLOW_PRIVATE_NETWORKS)."""

    type: Literal["postgres"]
    host: str = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.:_-]+$")
    port: int = Field(default=5432, ge=1, le=65535)
    database: str = Field(min_length=1, max_length=63)
    user: str = Field(min_length=1, max_length=63)
    password: SecretStr = Field(default=SecretStr(""), max_length=1024)
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = "prefer"


Secret = Annotated[
    ApiKeySecret | BearerSecret | BasicSecret | HeadersSecret | WebhookSecret | PostgresSecret,
    Field(discriminator="type"),
]


class CredentialCreate(StrictInput):
    name: Annotated[Name, Field(max_length=100)]
    secret: Secret


class CredentialUpdate(StrictInput):
    name: Annotated[Name, Field(max_length=100)] | None = None
    # Replaces the whole secret; its type may change.
    secret: Secret | None = None


class CredentialRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    workspace_id: uuid.UUID
    name: str
    type: str
    hint: str | None
    created_by: uuid.UUID | None
    created_at: datetime
    updated_at: datetime
    last_used_at: datetime | None
