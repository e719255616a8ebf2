"""Bodies of /mcp. Headers and env values go in and are never shown again: reads name
them only."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from backend.auth.schemas import Name, StrictInput
from backend.kit.bodies import is_header_value

Transport = Literal["streamable_http", "sse", "stdio"]
HeaderName = Annotated[str, Field(pattern=r"^[A-Za-z0-9-]{1,64}$")]
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
# Headers the transport sets itself; a tenant's copy would break or spoof the protocol.
RESERVED_HEADERS = frozenset(
    {"host", "content-length", "content-type", "accept", "mcp-session-id", "mcp-protocol-version",
     "transfer-encoding", "connection", "last-event-id"}
)  # fmt: skip


def _check_url(value: str | None) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("url must be an http(s) URL with a host")
    if parts.username or parts.password:
        raise ValueError("url must not carry credentials: put them in `headers` (kept encrypted)")
    return value


def _check_headers(value: dict[str, SecretStr] | None) -> dict[str, SecretStr] | None:
    for name, secret in (value or {}).items():
        if name.lower() in RESERVED_HEADERS:
            raise ValueError(f"header {name!r} is set by the MCP transport itself")
        if not is_header_value(secret.get_secret_value()):
            # As for credentials: the HTTP client's error would quote the value.
            raise ValueError(f"header {name!r}: must be ASCII without control characters")
    return value


class ServerFields(StrictInput):
    description: str = Field(default="", max_length=2000)
    url: str | None = Field(default=None, max_length=2000)
    # Encrypted at rest, never returned (only their names are).
    headers: dict[HeaderName, SecretStr] | None = Field(default=None, max_length=30)
    # stdio: the name of a server an operator listed in MCP__STDIO_SERVERS.
    command: str | None = Field(default=None, min_length=1, max_length=100)
    # stdio: refused unless empty: the operator's listing fixes the command line.
    args: list[str] | None = Field(default=None, max_length=0)
    env: dict[EnvName, SecretStr] | None = Field(default=None, max_length=30)
    timeout_s: float | None = Field(default=None, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return _check_url(value)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, SecretStr] | None) -> dict[str, SecretStr] | None:
        return _check_headers(value)


def shape_problem(
    transport: str, *, url: str | None, command: str | None, env: bool, headers: bool
) -> str | None:
    """Why these fields do not fit the transport (`field: message`), or None."""
    if transport in ("streamable_http", "sse"):
        if not url:
            return f"url: a {transport} server needs `url`"
        if command or env:
            return f"command: `command` and `env` are for stdio servers, not {transport}"
    else:
        if not command:
            return "command: a stdio server names an operator-listed `command`"
        if url or headers:
            return "url: `url` and `headers` are for HTTP transports, not stdio"
    return None


class McpServerCreate(ServerFields):
    name: Annotated[Name, Field(max_length=100)]
    transport: Transport


class McpServerPut(McpServerCreate):
    """Replaces the server's settings. Omitted `headers`/`env` keep the stored ones
    (they are never shown, so a read-modify-write must not wipe them); `{}` clears."""


class McpServerPatch(StrictInput):
    name: Annotated[Name, Field(max_length=100)] | None = None
    description: str | None = Field(default=None, max_length=2000)
    transport: Transport | None = None
    url: str | None = Field(default=None, max_length=2000)
    headers: dict[HeaderName, SecretStr] | None = Field(default=None, max_length=30)
    command: str | None = Field(default=None, min_length=1, max_length=100)
    args: list[str] | None = Field(default=None, max_length=0)
    env: dict[EnvName, SecretStr] | None = Field(default=None, max_length=30)
    timeout_s: float | None = Field(default=None, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return _check_url(value)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, SecretStr] | None) -> dict[str, SecretStr] | None:
        return _check_headers(value)


class McpServerRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    workspace_id: uuid.UUID
    name: str
    description: str
    transport: str
    url: str | None
    command: str | None
    header_names: list[str]
    env_names: list[str]
    timeout_s: float | None
    status: str
    status_reason: str | None
    last_connected_at: datetime | None
    server_info: dict[str, Any]
    created_by: uuid.UUID | None
    created_at: datetime
    updated_at: datetime


class McpToolRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    server_id: uuid.UUID
    name: str
    description: str
    input_schema: dict[str, Any]
    # approved (offered to agents and nodes) | changed (awaiting re-approval) | removed
    status: str
    hash: str
    approved_hash: str | None
    # What was approved before a change: {description, input_schema}, to compare.
    previous: dict[str, Any] | None
    approved_by: uuid.UUID | None
    approved_at: datetime | None
    last_seen_at: datetime | None


class ConnectResult(BaseModel):
    server: McpServerRead
    tools: list[McpToolRead]
    # Names of tools whose description or schema changed since approval.
    changed: list[str]
    added: list[str]
    removed: list[str]


class ApproveTools(StrictInput):
    """Approve tools as they are now (after reviewing a change): by name, or all."""

    tools: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=500
    )
    all: bool = False

    @model_validator(mode="after")
    def _something(self) -> ApproveTools:
        if not self.tools and not self.all:
            raise ValueError("tools: name the tools to approve, or send `all: true`")
        return self


class Template(BaseModel):
    id: str
    name: str
    description: str
    transport: Transport
    url: str | None = None
    command: str | None = None
    header_names: list[str] = Field(default_factory=list)
    env_names: list[str] = Field(default_factory=list)
    docs: str | None = None
    # True when this deployment can use it (stdio templates need an operator listing).
    available: bool = True
