"""Bodies of /n8n. The API key goes in and never comes out: reads say only whether one is
set. Where the error workflow posts (the intake URL) is shown to readers: it carries a
secret that only lets its holder report failures of this instance."""

from __future__ import annotations

import ipaddress
import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import (
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
)

from backend.auth.schemas import Name, StrictInput
from backend.n8n.api_types import EXECUTION_STATUSES

Label = Annotated[str, Field(min_length=1, max_length=50, pattern=r"^[\w .:/-]+$")]
N8nId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


# A host name's labels (after IDNA; `_` too: Docker and compose service names), or an
# IP literal (checked with ipaddress).
_HOST = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?$")


def check_url(value: str | None) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL with a host")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials: the API key goes in `api_key`")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or (port is None and ":" in parts.netloc.rsplit("]", 1)[-1]):
        raise ValueError("the port must be a number from 1 to 65535")
    if not _valid_host(parts.hostname):
        raise ValueError("the host must be a domain name or an IP address")
    try:
        # What the HTTP client will make of it (its IDNA rules are stricter than
        # Python's codec): a URL it cannot send is refused here, not at the first call.
        httpx.URL(value)
    except httpx.InvalidURL as exc:
        raise ValueError(f"not a URL the HTTP client accepts: {exc}") from None
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query or fragment")
    return value.rstrip("/")


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    return len(ascii_host) <= 253 and _HOST.match(ascii_host) is not None


# What n8n issues (a JWT) and what an HTTP header can carry: printable ASCII, no spaces.
# Anything else failed only later, inside the HTTP client, with the key in the error.
_API_KEY = re.compile(r"^[\x21-\x7e]+$")


def check_api_key(value: SecretStr | None) -> SecretStr | None:
    if value is not None and not _API_KEY.match(value.get_secret_value()):
        # The message never repeats the key.
        raise ValueError("must be printable ASCII without spaces, as n8n issues API keys")
    return value


class Notify(StrictInput):
    """Who else hears of the instance's failures, besides the people who watch it."""

    emails: list[EmailStr] = Field(default_factory=list, max_length=20)
    webhooks: list[Annotated[str, Field(max_length=2000)]] = Field(
        default_factory=list, max_length=10
    )

    @field_validator("webhooks")
    @classmethod
    def _webhooks(cls, value: list[str]) -> list[str]:
        for url in value:
            check_url(url)
        return value


class InstanceCreate(StrictInput):
    name: Annotated[Name, Field(max_length=100)]
    base_url: str = Field(
        max_length=2000, description="where n8n answers, e.g. https://n8n.example.com"
    )
    api_key: SecretStr = Field(min_length=1, max_length=2000)
    environment: Label = "production"
    tags: list[Label] = Field(default_factory=list, max_length=20)
    enabled: bool = True
    notify: Notify = Field(default_factory=Notify)

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        checked = check_url(value)
        assert checked is not None
        return checked

    @field_validator("api_key")
    @classmethod
    def _key(cls, value: SecretStr) -> SecretStr | None:
        return check_api_key(value)


class InstancePatch(StrictInput):
    name: Annotated[Name, Field(max_length=100)] | None = None
    base_url: str | None = Field(default=None, max_length=2000)
    api_key: SecretStr | None = Field(default=None, min_length=1, max_length=2000)
    environment: Label | None = None
    tags: list[Label] | None = Field(default=None, max_length=20)
    enabled: bool | None = None
    notify: Notify | None = None

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return check_url(value)

    @field_validator("api_key")
    @classmethod
    def _key(cls, value: SecretStr | None) -> SecretStr | None:
        return check_api_key(value)


class InstanceRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    workspace_id: uuid.UUID
    name: str
    base_url: str
    environment: str
    tags: list[str]
    enabled: bool
    has_api_key: bool = True
    # unknown | ok | unauthorized | forbidden | unreachable | error
    status: str
    status_reason: str | None
    n8n_version: str | None
    capabilities: dict[str, Any]
    last_checked_at: datetime | None
    last_synced_at: datetime | None
    sync_error: str | None
    error_workflow_id: str | None
    notify: dict[str, Any]
    # Where the instance's error workflow posts failures (set on every read).
    intake_url: str | None = None
    created_by: uuid.UUID | None
    created_at: datetime
    updated_at: datetime


class InstanceCreated(InstanceRead):
    # The key that signs our notification webhooks of this instance's failures
    # (Standard Webhooks headers). Shown only in this answer.
    webhook_secret: str


class TestResult(BaseModel):
    ok: bool
    status: str
    reason: str | None
    n8n_version: str | None
    # Read scopes the key was seen to hold ({"execution:list": false}: refused).
    capabilities: dict[str, Any]
    instance: InstanceRead


class SyncResult(BaseModel):
    ok: bool
    status: str
    reason: str | None
    workflows: int = 0
    workflows_removed: int = 0
    executions: int = 0
    # A burst larger than N8N__MAX_EXECUTION_PAGES pages: older executions remain to be
    # read and the next syncs continue where this one stopped.
    executions_pending: bool = False
    instance: InstanceRead


class WorkflowRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    instance_id: uuid.UUID
    n8n_id: str
    name: str
    active: bool
    archived: bool
    tags: list[str]
    version_id: str | None
    node_count: int
    error_workflow: str | None
    n8n_created_at: datetime | None
    n8n_updated_at: datetime | None
    synced_at: datetime | None


class WorkflowDetail(WorkflowRead):
    # The n8n definition: {nodes, connections, settings}.
    definition: dict[str, Any]


class ExecutionRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    instance_id: uuid.UUID
    n8n_id: str
    workflow_n8n_id: str | None
    workflow_id: uuid.UUID | None
    status: str
    mode: str | None
    finished: bool
    started_at: datetime | None
    stopped_at: datetime | None
    retry_of: str | None
    error_message: str | None
    failed_node: str | None


class ErrorRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    instance_id: uuid.UUID
    execution_n8n_id: str | None
    workflow_n8n_id: str | None
    workflow_id: uuid.UUID | None
    workflow_name: str | None
    node: str | None
    message: str
    url: str | None
    mode: str | None
    reports: int
    notified: dict[str, Any]
    created_at: datetime


class Toggle(StrictInput):
    active: bool


class RetryRequest(StrictInput):
    # true: run the workflow as saved now; false: as it was when the execution ran.
    load_workflow: bool = False


class InstallErrorWorkflow(StrictInput):
    # n8n ids of workflows whose errors should go to the installed error workflow.
    workflow_ids: list[N8nId] = Field(default_factory=list, max_length=500)
    # Every synced workflow of the instance (except the error workflow itself).
    all_workflows: bool = False
    # Our API's base URL as n8n reaches it; default: N8N__INTAKE_BASE_URL, else this
    # request's own base URL.
    intake_base_url: str | None = Field(default=None, max_length=2000)

    @field_validator("intake_base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return check_url(value)

    @field_validator("all_workflows")
    @classmethod
    def _one_choice(cls, value: bool, info: ValidationInfo) -> bool:
        # Declared after workflow_ids, so that one is already in info.data.
        if value and info.data.get("workflow_ids"):
            raise ValueError("send workflow_ids or all_workflows: true, not both")
        return value


class InstallResult(BaseModel):
    error_workflow_id: str
    created: bool
    active: bool
    intake_url: str
    # Workflows now naming it as their error workflow, and the ones n8n refused.
    linked: list[str]
    failed: dict[str, str]


class WatchCreate(StrictInput):
    # One workflow's failures (its n8n id), or every workflow's (omitted).
    workflow_n8n_id: N8nId | None = None


class WatchRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    instance_id: uuid.UUID
    user_id: uuid.UUID
    workflow_n8n_id: str
    created_at: datetime


class IntakeAccepted(BaseModel):
    error_id: uuid.UUID
    # False when this execution's failure was reported before (nobody is told again).
    new: bool


ExecutionStatusFilter = Literal[
    "canceled", "crashed", "error", "new", "running", "success", "unknown", "waiting"
]
assert set(EXECUTION_STATUSES) == set(ExecutionStatusFilter.__args__)  # type: ignore[attr-defined]
