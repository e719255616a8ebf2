"""The workflow definition, its node config schemas, and the one validator that saving
and running both use. Pure: whatever it needs from the database comes in a context.

A definition is `{"nodes": [...], "connections": [...], "settings": {...}}` (DESIGN.md).
Every problem found is reported with where it is: the node id and the field.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import networkx as nx
from croniter import CroniterBadDateError, croniter
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from backend.workflows.templates import ExpressionError, parse_expression, parse_template

NodeId = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Templates and conditions are plain strings in the schema; the validator parses them.
Template = str
Condition = str


# Triggers -------------------------------------------------------------------------------


class ManualTrigger(Strict):
    kind: Literal["manual"]
    input_schema: dict[str, Any] | None = None


class ScheduleTrigger(Strict):
    """A cron expression in an IANA time zone, or a fixed interval."""

    kind: Literal["schedule"]
    cron: str | None = None
    timezone: str = "UTC"
    # Seconds between runs; at least a minute, like cron's precision.
    interval_s: int | None = Field(default=None, ge=60, le=366 * 86_400)
    # Slots missed while beat was down: none of them run (skip), or one run (fire_once).
    misfire: Literal["skip", "fire_once"] = "skip"

    @model_validator(mode="after")
    def _valid(self) -> ScheduleTrigger:
        from datetime import UTC, datetime
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        if (self.cron is None) == (self.interval_s is None):
            raise ValueError("cron: give exactly one of `cron` or `interval_s`")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"timezone: unknown time zone {self.timezone!r}") from exc
        if self.cron is None:
            return self
        # Five fields (minute precision): beat ticks every few seconds, not every one.
        if len(self.cron.split()) != 5 or not croniter.is_valid(self.cron):
            raise ValueError(f"cron: {self.cron!r} is not a valid 5-field cron expression")
        try:
            croniter(self.cron, datetime.now(UTC)).get_next(datetime)
        except (CroniterBadDateError, ValueError) as exc:
            raise ValueError(f"cron: {self.cron!r} never fires") from exc
        return self


class WebhookTrigger(Strict):
    kind: Literal["webhook"]
    verify_signature: bool = False
    respond: Literal["immediately", "when_finished"] = "immediately"


class EventTrigger(Strict):
    kind: Literal["event"]
    workflow_id: uuid.UUID
    on: list[Literal["completed", "failed"]] = Field(default=["completed"], min_length=1)


TriggerConfig = Annotated[
    ManualTrigger | ScheduleTrigger | WebhookTrigger | EventTrigger, Field(discriminator="kind")
]


# Agent ----------------------------------------------------------------------------------


class AgentTool(Strict):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str = ""
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class AgentConfig(Strict):
    agent_id: uuid.UUID | None = None
    model: str | None = None
    system_prompt: str | None = None
    prompt: Template
    tools: list[AgentTool] = Field(default_factory=list)
    temperature: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=64_000)
    max_iterations: int = Field(default=10, ge=1, le=100)

    @model_validator(mode="after")
    def _agent_or_model(self) -> AgentConfig:
        if self.agent_id is None and self.model is None:
            raise ValueError("agent_id: give an agent_id or an inline model")
        return self


# Actions --------------------------------------------------------------------------------


class HttpRequestAction(Strict):
    kind: Literal["http_request"]
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] = "GET"
    url: Template
    headers: dict[str, Template] = Field(default_factory=dict)
    query: dict[str, Template] = Field(default_factory=dict)
    body: Template | dict[str, Any] | None = None
    credential_id: uuid.UUID | None = None
    timeout_s: float = Field(default=30, gt=0, le=600)
    max_response_bytes: int = Field(default=5 * 1024 * 1024, ge=1, le=100 * 1024 * 1024)


class FileReadAction(Strict):
    """A file of the workspace's storage, by `path`, or an uploaded file (the files
    API) by `file_id` (a template, so an upstream node's output can name it)."""

    kind: Literal["file_read"]
    path: Template | None = None
    file_id: Template | None = None
    # Output the parsed JSON document instead of its text.
    parse_json: bool = False

    @model_validator(mode="after")
    def _one_target(self) -> FileReadAction:
        if (self.path is None) == (self.file_id is None):
            raise ValueError("path: give exactly one of `path` or `file_id`")
        return self


class FileWriteAction(Strict):
    """Writes `path`, or replaces the content of the uploaded file `file_id`."""

    kind: Literal["file_write"]
    path: Template | None = None
    file_id: Template | None = None
    content: Template
    # base64: the rendered content is decoded first (binary files, e.g. a file_read's
    # base64 output written elsewhere).
    encoding: Literal["text", "base64"] = "text"

    @model_validator(mode="after")
    def _one_target(self) -> FileWriteAction:
        if (self.path is None) == (self.file_id is None):
            raise ValueError("path: give exactly one of `path` or `file_id`")
        return self


class DatabaseAction(Strict):
    """One parameterised SQL statement against the PostgreSQL database a `postgres`
    credential names. Values travel as bind parameters (`%(name)s` in `query`), never
    formatted into the SQL; read-only unless `write` is set."""

    kind: Literal["database"]
    credential_id: uuid.UUID
    # SQL text, not a template: only `parameters` carry run data.
    query: str = Field(min_length=1, max_length=100_000)
    parameters: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")], Template] = (
        Field(default_factory=dict, max_length=100)
    )
    write: bool = False
    # Capped by DBNODE__MAX_ROWS and DBNODE__STATEMENT_TIMEOUT_S.
    max_rows: int | None = Field(default=None, ge=1, le=100_000)
    timeout_s: float | None = Field(default=None, gt=0, le=3600)


class NotifyAction(Strict):
    kind: Literal["notify"]
    channel: Literal["email", "webhook"]
    to: Template | None = None
    url: Template | None = None
    subject: Template = ""
    message: Template
    credential_id: uuid.UUID | None = None

    @model_validator(mode="after")
    def _target(self) -> NotifyAction:
        if self.channel == "email" and not self.to:
            raise ValueError("to: an email notification needs `to`")
        if self.channel == "webhook" and not self.url:
            raise ValueError("url: a webhook notification needs `url`")
        return self


class N8nAction(Strict):
    """Drive a workflow on one of the workspace's n8n instances (backend/n8n).
    `webhook`: call the workflow's production webhook (the instance's base URL +
    `/webhook/<path>` of its Webhook node; the workflow must be active). n8n 2.41's public
    API has no route that runs a workflow, so that is how a flow starts one.
    `retry_execution`: n8n's `POST /executions/{id}/retry` (optionally with the saved
    workflow). The API key never travels to the webhook."""

    kind: Literal["n8n"]
    instance_id: uuid.UUID
    operation: Literal["webhook", "retry_execution"] = "webhook"
    # n8n's id of the workflow (webhook: whose Webhook node is called).
    n8n_workflow_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # Which Webhook node, by its path, when the workflow has several.
    webhook_path: str | None = Field(default=None, min_length=1, max_length=500)
    # Default: the Webhook node's own HTTP method.
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] | None = None
    headers: dict[str, Template] = Field(default_factory=dict)
    query: dict[str, Template] = Field(default_factory=dict)
    body: Template | dict[str, Any] | None = None
    # retry_execution: n8n's execution id (a template: an upstream node may give it).
    execution_id: Template | None = None
    load_workflow: bool = False
    timeout_s: float = Field(default=30, gt=0, le=600)
    max_response_bytes: int = Field(default=5 * 1024 * 1024, ge=1, le=100 * 1024 * 1024)

    @model_validator(mode="after")
    def _operation_needs(self) -> N8nAction:
        if self.operation == "webhook" and self.n8n_workflow_id is None:
            raise ValueError("n8n_workflow_id: the webhook operation needs the n8n workflow's id")
        if self.operation == "retry_execution" and not self.execution_id:
            raise ValueError("execution_id: retry_execution needs the n8n execution's id")
        return self


ActionConfig = Annotated[
    HttpRequestAction
    | FileReadAction
    | FileWriteAction
    | NotifyAction
    | DatabaseAction
    | N8nAction,
    Field(discriminator="kind"),
]


# Logic ----------------------------------------------------------------------------------


class IfLogic(Strict):
    kind: Literal["if"]
    condition: Condition


class SwitchCase(Strict):
    when: Condition
    branch: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class SwitchLogic(Strict):
    kind: Literal["switch"]
    cases: list[SwitchCase] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> SwitchLogic:
        labels = [c.branch for c in self.cases]
        if len(set(labels)) != len(labels) or "default" in labels:
            raise ValueError("cases: branch labels must be unique and not 'default'")
        return self


class Body(Strict):
    """A loop body: a small graph of its own, run once per item (for_each) or per pass
    (while). It holds no approval, wait or loop step of its own (a body workflow may)."""

    nodes: list[dict[str, Any]] = Field(min_length=1)
    connections: list[dict[str, Any]] = Field(default_factory=list)


# What a loop's body (and a while condition) may read besides the usual roots.
LOOP_ROOTS: dict[str, frozenset[str]] = {
    "for_each": frozenset({"item", "index"}),
    "while": frozenset({"iteration", "last"}),
}


class ForEachLogic(Strict):
    kind: Literal["for_each"]
    items: Condition
    body: Body | None = None
    workflow_id: uuid.UUID | None = None
    max_concurrency: int = Field(default=1, ge=1, le=50)
    max_items: int = Field(default=1000, ge=1, le=100_000)

    @model_validator(mode="after")
    def _one_body(self) -> ForEachLogic:
        if (self.body is None) == (self.workflow_id is None):
            raise ValueError("body: give exactly one of `body` or `workflow_id`")
        return self


class WhileLogic(Strict):
    """Runs its body (a graph, or another workflow) again while `condition` holds; the
    condition sees `iteration` (0, 1, ...) and `last`, the previous pass's output."""

    kind: Literal["while"]
    condition: Condition
    body: Body | None = None
    workflow_id: uuid.UUID | None = None
    # Mandatory: a loop that cannot end is a bug, not a feature. Reaching it fails the
    # node rather than passing off a half-finished loop as done.
    max_iterations: int = Field(ge=1, le=10_000)

    @model_validator(mode="after")
    def _one_body(self) -> WhileLogic:
        if (self.body is None) == (self.workflow_id is None):
            raise ValueError("body: give exactly one of `body` or `workflow_id`")
        return self


class MergeLogic(Strict):
    kind: Literal["merge"]
    mode: Literal["all", "any"] = "all"


class SetLogic(Strict):
    kind: Literal["set"]
    variables: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], Template] = Field(
        min_length=1
    )


class TransformLogic(Strict):
    kind: Literal["transform"]
    template: Template


def _json_schema_problem(schema: dict[str, Any]) -> str | None:
    """Why `schema` is not a usable JSON Schema (checked by parsing, never by running)."""
    from jsonschema import Draft202012Validator, SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        return f"not a valid JSON Schema: {exc.message}"
    if schema.get("type", "object") != "object":
        return "the form's schema must describe an object (type: object)"
    # The validator input is checked with (linear-time regexes): it must accept it too.
    import jsonschema_rs

    try:
        # offline: a `$ref` to a URL is never fetched (no request from our network on a
        # form's say-so; the form must be self-contained).
        jsonschema_rs.validator_for(schema, offline=True)
    except Exception as exc:
        return f"not a usable JSON Schema: {str(exc)[:200]}"
    return None


class ApprovalLogic(Strict):
    """Parks the run (no worker slot held) until a person decides: a task in the inbox
    (GET /tasks) with a title, a message and the data to review, decided by approve or
    reject with an optional comment and form input (checked against `form`, a JSON
    Schema). Who may decide: `assignees` (user ids) and/or members of at least
    `min_role`; neither: the members who may execute the workflow. After `expires_in`
    seconds the task expires and `on_timeout` decides. The decision is the node's
    output; its branches are `approved` and `rejected`."""

    kind: Literal["approval"]
    title: Template = Field(min_length=1, max_length=500)
    message: Template = Field(default="", max_length=20_000)
    # What the person reviews: a template, or JSON whose strings are templates.
    data: Template | dict[str, Any] | None = None
    form: dict[str, Any] | None = None
    assignees: list[uuid.UUID] = Field(default_factory=list, max_length=100)
    min_role: Literal["viewer", "editor", "administrator", "owner"] | None = None
    expires_in: int | None = Field(default=None, ge=1, le=366 * 86_400)
    on_timeout: Literal["reject", "approve", "fail"] = "reject"
    # E-mail (with one-time approve/reject links), in-app and push notices to the
    # people who may decide.
    notify: bool = True

    @model_validator(mode="after")
    def _form(self) -> ApprovalLogic:
        if self.form is not None:
            problem = _json_schema_problem(self.form)
            if problem:
                raise ValueError(f"form: {problem}")
        return self


class WaitLogic(Strict):
    """Parks the run (no worker slot held) for `duration_s` seconds, until the time
    `until` renders to (ISO 8601), or until someone calls its one-time resume URL
    (`resume_url: true`; signed, single use, an optional JSON body becomes the output;
    the URL is `execution.resume_urls.<node id>` in templates of the nodes before it).
    A resume URL may have a `timeout_s`, after which the node takes its `timed_out`
    branch (`resumed` otherwise)."""

    kind: Literal["wait"]
    duration_s: float | None = Field(default=None, ge=0, le=366 * 86_400, allow_inf_nan=False)
    until: Template | None = None
    resume_url: bool = False
    timeout_s: float | None = Field(default=None, gt=0, le=366 * 86_400, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_mode(self) -> WaitLogic:
        modes = [self.duration_s is not None, self.until is not None, self.resume_url]
        if sum(modes) != 1:
            raise ValueError(
                "duration_s: give exactly one of `duration_s`, `until` or `resume_url`"
            )
        if self.timeout_s is not None and not self.resume_url:
            raise ValueError("timeout_s: only a `resume_url` wait has a timeout")
        return self


LogicConfig = Annotated[
    IfLogic
    | SwitchLogic
    | ForEachLogic
    | WhileLogic
    | MergeLogic
    | SetLogic
    | TransformLogic
    | ApprovalLogic
    | WaitLogic,
    Field(discriminator="kind"),
]


# Integrations ---------------------------------------------------------------------------


class SubWorkflowIntegration(Strict):
    kind: Literal["sub_workflow"]
    workflow_id: uuid.UUID
    input: dict[str, Template] = Field(default_factory=dict)
    wait: bool = True


class McpToolIntegration(Strict):
    kind: Literal["mcp_tool"]
    server_id: uuid.UUID
    tool: str = Field(min_length=1, max_length=128)
    arguments: dict[str, Template] = Field(default_factory=dict)


IntegrationConfig = Annotated[
    SubWorkflowIntegration | McpToolIntegration, Field(discriminator="kind")
]

CONFIG_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    "trigger": TypeAdapter(TriggerConfig),
    "agent": TypeAdapter(AgentConfig),
    "action": TypeAdapter(ActionConfig),
    "logic": TypeAdapter(LogicConfig),
    "integration": TypeAdapter(IntegrationConfig),
}


# Nodes, connections, definition -----------------------------------------------------------


ErrorClass = Literal["timeout", "connection", "rate_limited", "server_error", "overloaded"]
TRANSIENT: list[ErrorClass] = [
    "timeout",
    "connection",
    "rate_limited",
    "server_error",
    "overloaded",
]


class RetryPolicy(Strict):
    """Transient errors retried; permanent ones (4xx, validation, spend limit) never are."""

    max_retries: int = Field(default=3, ge=0, le=10)
    # Finite, and no longer than a day: a wait past the broker's countdown cap is capped
    # anyway, and NaN or infinity would reach the database as a checkpoint's time.
    backoff_s: list[Annotated[float, Field(ge=0, le=86_400, allow_inf_nan=False)]] = Field(
        default=[5.0, 30.0, 120.0], max_length=10
    )
    # Pydantic copies mutable defaults per instance.
    on: list[ErrorClass] = Field(default=TRANSIENT)


class Node(Strict):
    id: NodeId
    type: Literal["trigger", "agent", "action", "logic", "integration"]
    config: dict[str, Any] = Field(default_factory=dict)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    timeout_s: float | None = Field(default=None, gt=0, le=86_400)
    continue_on_error: bool = False
    # UI fields, kept verbatim.
    position: dict[str, Any] | None = None
    label: str | None = Field(default=None, max_length=200)


class Connection(Strict):
    source: str
    target: str
    branch: str | None = None


class NotificationWebhook(Strict):
    # Signed with the workflow's notification secret (Standard Webhooks headers).
    url: str = Field(pattern=r"^https?://", max_length=2000)


class Notifications(Strict):
    """Who hears about a run's end: emails and/or signed webhooks, on the outcomes in
    `on` (failure by default; add "completed" for success too)."""

    on: list[Literal["failed", "completed"]] = Field(default=["failed"], min_length=1)
    emails: list[Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+$", max_length=320)]] = Field(
        default_factory=list, max_length=20
    )
    webhooks: list[NotificationWebhook] = Field(default_factory=list, max_length=10)


class WorkflowSettings(Strict):
    timeout_s: int = Field(default=3600, ge=1, le=86_400)
    max_concurrency: int = Field(default=4, ge=1, le=64)
    # Kept for older definitions: addresses mailed when a run fails. Same as
    # notifications.emails with on=["failed"].
    notify_on_failure: list[str] = Field(default_factory=list)
    notifications: Notifications | None = None


class Definition(Strict):
    nodes: list[dict[str, Any]] = Field(default_factory=list, max_length=500)
    connections: list[dict[str, Any]] = Field(default_factory=list, max_length=2000)
    settings: dict[str, Any] = Field(default_factory=dict)


# Validation -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    message: str
    node_id: str | None = None
    field: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "field": self.field, "message": self.message}


class GraphInvalid(ValueError):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(p.message for p in problems[:3]))
        self.problems = problems


@dataclass
class Context:
    """What the validator needs to know about the workspace, as plain lookups."""

    workflow_id: uuid.UUID | None = None
    workflow_ids: frozenset[uuid.UUID] = frozenset()
    agent_ids: frozenset[uuid.UUID] = frozenset()
    credential_ids: frozenset[uuid.UUID] = frozenset()
    # MCP servers of the workspace; None: not checked.
    mcp_server_ids: frozenset[uuid.UUID] | None = None
    # n8n instances of the workspace; None: not checked.
    n8n_instance_ids: frozenset[uuid.UUID] | None = None
    # Input schemas of the tools offered by those servers, by (server id, tool name);
    # None: not checked. Tools marked `changed` or removed are left out.
    mcp_tools: dict[tuple[uuid.UUID, str], dict[str, Any]] | None = None
    # Sub-workflows each workflow of the workspace references, by its current version.
    references: Callable[[uuid.UUID], Iterable[uuid.UUID]] = field(default=lambda _: ())
    # The workflows whose runs start each workflow of the workspace (event triggers).
    event_sources: Callable[[uuid.UUID], Iterable[uuid.UUID]] = field(default=lambda _: ())


@dataclass
class ValidGraph:
    definition: dict[str, Any]
    nodes: dict[str, Node]
    configs: dict[str, Any]
    graph: nx.DiGraph  # type: ignore[type-arg]
    settings: WorkflowSettings


def branch_labels(node: Node, config: Any) -> set[str] | None:
    """The branch labels a node's outgoing connections may carry (None: no labels)."""
    if isinstance(config, IfLogic):
        return {"true", "false"}
    if isinstance(config, SwitchLogic):
        return {c.branch for c in config.cases} | {"default"}
    if isinstance(config, ApprovalLogic):
        return {"approved", "rejected"} | ({"error"} if node.continue_on_error else set())
    if isinstance(config, WaitLogic) and config.resume_url:
        return {"resumed", "timed_out"} | ({"error"} if node.continue_on_error else set())
    if node.continue_on_error:
        return {"error"}
    return None


def _strings_in(value: Any, path: str) -> Iterable[tuple[str, str, bool]]:
    """Every string inside a JSON body is a template too."""
    if isinstance(value, str):
        yield path, value, False
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings_in(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings_in(item, f"{path}[{index}]")


def _expressions(config: Any) -> Iterable[tuple[str, str, bool]]:
    """(field, source, is_condition) for every template or condition in a config."""
    if isinstance(config, IfLogic | WhileLogic):
        yield "condition", config.condition, True
    elif isinstance(config, SwitchLogic):
        for i, case in enumerate(config.cases):
            yield f"cases[{i}].when", case.when, True
    elif isinstance(config, ForEachLogic):
        yield "items", config.items, True
    elif isinstance(config, AgentConfig):
        yield "prompt", config.prompt, False
        if config.system_prompt:
            yield "system_prompt", config.system_prompt, False
    elif isinstance(config, HttpRequestAction):
        yield "url", config.url, False
        for key, value in config.headers.items():
            yield f"headers.{key}", value, False
        for key, value in config.query.items():
            yield f"query.{key}", value, False
        if isinstance(config.body, str):
            yield "body", config.body, False
        elif isinstance(config.body, dict):
            yield from _strings_in(config.body, "body")
    elif isinstance(config, N8nAction):
        for key, value in config.headers.items():
            yield f"headers.{key}", value, False
        for key, value in config.query.items():
            yield f"query.{key}", value, False
        if isinstance(config.body, str):
            yield "body", config.body, False
        elif isinstance(config.body, dict):
            yield from _strings_in(config.body, "body")
        if config.execution_id:
            yield "execution_id", config.execution_id, False
    elif isinstance(config, FileReadAction):
        for name in ("path", "file_id"):
            value = getattr(config, name)
            if value is not None:
                yield name, value, False
    elif isinstance(config, FileWriteAction):
        for name in ("path", "file_id"):
            value = getattr(config, name)
            if value is not None:
                yield name, value, False
        yield "content", config.content, False
    elif isinstance(config, DatabaseAction):
        for key, value in config.parameters.items():
            yield f"parameters.{key}", value, False
    elif isinstance(config, NotifyAction):
        for name in ("to", "url", "subject", "message"):
            value = getattr(config, name)
            if value:
                yield name, value, False
    elif isinstance(config, SetLogic):
        for key, value in config.variables.items():
            yield f"variables.{key}", value, False
    elif isinstance(config, TransformLogic):
        yield "template", config.template, False
    elif isinstance(config, ApprovalLogic):
        yield "title", config.title, False
        if config.message:
            yield "message", config.message, False
        if isinstance(config.data, str):
            yield "data", config.data, False
        elif isinstance(config.data, dict):
            yield from _strings_in(config.data, "data")
    elif isinstance(config, WaitLogic) and config.until is not None:
        yield "until", config.until, False
    elif isinstance(config, SubWorkflowIntegration):
        for key, value in config.input.items():
            yield f"input.{key}", value, False
    elif isinstance(config, McpToolIntegration):
        for key, value in config.arguments.items():
            yield f"arguments.{key}", value, False


def _recurses(
    start: uuid.UUID, target: uuid.UUID, references: Callable[[uuid.UUID], Iterable[uuid.UUID]]
) -> bool:
    seen: set[uuid.UUID] = set()
    stack = [start]
    while stack:
        current = stack.pop()
        if current == target:
            return True
        if current in seen:
            continue
        seen.add(current)
        stack.extend(references(current))
    return False


REFERENCE_FIELDS = ("agent_id", "credential_id", "workflow_id", "server_id", "instance_id")


def node_configs(definition: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node's raw config, for_each bodies included; anything malformed is passed
    over (the validator explains it elsewhere)."""
    out: list[dict[str, Any]] = []
    nodes = definition.get("nodes")
    for node in nodes if isinstance(nodes, list) else []:
        config = node.get("config") if isinstance(node, dict) else None
        if isinstance(config, dict):
            out.append(config)
            body = config.get("body")
            if isinstance(body, dict):
                out += node_configs(body)
    return out


def referenced_workflows(definition: dict[str, Any]) -> set[uuid.UUID]:
    """Sub-workflow ids a definition calls (sub_workflow nodes and for_each bodies)."""
    out: set[uuid.UUID] = set()
    for cfg in node_configs(definition):
        if cfg.get("kind") in ("sub_workflow", "for_each", "while") and cfg.get("workflow_id"):
            try:
                out.add(uuid.UUID(str(cfg["workflow_id"])))
            except ValueError:
                continue
    return out


def event_sources(definition: dict[str, Any]) -> set[uuid.UUID]:
    """The workflows whose runs start this one (its event trigger nodes)."""
    out: set[uuid.UUID] = set()
    nodes = definition.get("nodes")
    for node in nodes if isinstance(nodes, list) else []:
        config = node.get("config") if isinstance(node, dict) else None
        if isinstance(config, dict) and config.get("kind") == "event":
            try:
                out.add(uuid.UUID(str(config.get("workflow_id"))))
            except ValueError:
                continue
    return out


# A whole definition as JSON (UTF-8 text, compact): room for hundreds of nodes with long
# prompts and templates. Checked on input only (definition_size_problem): a version
# stored before, or one jsonb prints longer than it was sent, still runs.
MAX_DEFINITION_CHARS = 2_000_000


def definition_size_problem(raw: dict[str, Any]) -> Problem | None:
    """A definition too large to accept: parsing templates costs ~4.5 s per MB here, and
    500 nodes of 20 000-character templates (10 MB) held a process for 45 s."""
    size = len(json.dumps(raw, default=str, ensure_ascii=False, separators=(",", ":")))
    if size <= MAX_DEFINITION_CHARS:
        return None
    message = f"the definition is {size} characters as JSON; at most {MAX_DEFINITION_CHARS}"
    return Problem(message, field="nodes")


def validate(
    raw: dict[str, Any],
    ctx: Context,
    *,
    require_trigger: bool = True,
    extra_roots: frozenset[str] = frozenset(),
) -> ValidGraph:
    """Check a definition; raise GraphInvalid listing every problem with its place.
    CPU-bound (every template is parsed): callers on an event loop run it in a thread,
    and input is sized first (definition_size_problem)."""
    problems: list[Problem] = []
    try:
        definition = Definition.model_validate(raw)
    except ValidationError as exc:
        raise GraphInvalid(
            [Problem(e["msg"], field=".".join(map(str, e["loc"]))) for e in exc.errors()]
        ) from exc

    nodes: dict[str, Node] = {}
    configs: dict[str, Any] = {}
    for index, raw_node in enumerate(definition.nodes):
        node_id = raw_node.get("id") if isinstance(raw_node.get("id"), str) else None
        try:
            node = Node.model_validate(raw_node)
        except ValidationError as exc:
            for e in exc.errors():
                problems.append(
                    Problem(
                        e["msg"],
                        node_id=node_id,
                        field=".".join(map(str, e["loc"])) or f"nodes[{index}]",
                    )
                )
            continue
        if node.id in nodes:
            problems.append(
                Problem(f"node id {node.id!r} is used more than once", node_id=node.id, field="id")
            )
            continue
        nodes[node.id] = node
        try:
            configs[node.id] = CONFIG_ADAPTERS[node.type].validate_python(node.config)
        except ValidationError as exc:
            for e in exc.errors():
                loc = [str(p) for p in e["loc"]]
                # A discriminated union puts the kind first; the client never wrote it.
                if loc and loc[0] == str(node.config.get("kind")):
                    loc = loc[1:]
                msg = e["msg"].removeprefix("Value error, ")
                if e["type"].startswith("union_tag"):
                    loc = ["kind"]
                field_name = "config." + ".".join(loc) if loc else "config"
                if ": " in msg and not loc:
                    head, _, rest = msg.partition(": ")
                    if head.replace("_", "").isalnum():
                        field_name, msg = f"config.{head}", rest
                problems.append(Problem(msg, node_id=node.id, field=field_name))

    try:
        settings = WorkflowSettings.model_validate(definition.settings)
    except ValidationError as exc:
        settings = WorkflowSettings()
        for e in exc.errors():
            problems.append(Problem(e["msg"], field="settings." + ".".join(map(str, e["loc"]))))

    graph: nx.DiGraph = nx.DiGraph()  # type: ignore[type-arg]
    graph.add_nodes_from(nodes)
    for index, raw_conn in enumerate(definition.connections):
        try:
            conn = Connection.model_validate(raw_conn)
        except ValidationError as exc:
            for e in exc.errors():
                problems.append(
                    Problem(e["msg"], field=f"connections[{index}]." + ".".join(map(str, e["loc"])))
                )
            continue
        missing = [end for end in (conn.source, conn.target) if end not in nodes]
        if missing:
            problems.append(
                Problem(
                    f"connection {conn.source} -> {conn.target} "
                    f"names a missing node {missing[0]!r}",
                    node_id=missing[0],
                    field=f"connections[{index}]",
                )
            )
            continue
        if conn.branch is not None:
            labels = branch_labels(nodes[conn.source], configs.get(conn.source))
            if labels is None or conn.branch not in labels:
                allowed = ", ".join(sorted(labels)) if labels else "none"
                problems.append(
                    Problem(
                        f"branch {conn.branch!r} does not exist on {conn.source} "
                        f"(allowed: {allowed})",
                        node_id=conn.source,
                        field=f"connections[{index}].branch",
                    )
                )
                continue
        if nodes[conn.target].type == "trigger":
            problems.append(
                Problem(
                    f"trigger {conn.target} cannot have incoming connections",
                    node_id=conn.target,
                    field=f"connections[{index}]",
                )
            )
        graph.add_edge(conn.source, conn.target, branch=conn.branch)

    if not nx.is_directed_acyclic_graph(graph):
        cycle = [edge[0] for edge in nx.find_cycle(graph)]
        problems.append(
            Problem(
                f"the graph has a cycle: {' -> '.join([*cycle, cycle[0]])}",
                node_id=cycle[0],
                field="connections",
            )
        )
        raise GraphInvalid(problems)

    triggers = [n for n in nodes.values() if n.type == "trigger"]
    if require_trigger and not triggers and not any(p.field == "type" for p in problems):
        problems.append(Problem("a workflow needs at least one trigger node", field="nodes"))

    roots = extra_roots
    for node_id, config in configs.items():
        upstream = nx.ancestors(graph, node_id)
        for field_name, source, is_condition in _expressions(config):
            try:
                parsed = parse_expression(source) if is_condition else parse_template(source)
            except ExpressionError as exc:
                problems.append(Problem(str(exc), node_id=node_id, field=f"config.{field_name}"))
                continue
            visible = roots | (LOOP_ROOTS["while"] if isinstance(config, WhileLogic) else set())
            unknown_roots = parsed.roots - {"trigger", "nodes", "vars", "execution"} - visible
            if unknown_roots & (LOOP_ROOTS["for_each"] | LOOP_ROOTS["while"]):
                problems.append(
                    Problem(
                        f"{sorted(unknown_roots)[0]!r} exists only inside a loop body",
                        node_id=node_id,
                        field=f"config.{field_name}",
                    )
                )
            for ref in sorted(parsed.node_refs):
                if ref not in nodes:
                    problems.append(
                        Problem(
                            f"refers to node {ref!r}, which does not exist",
                            node_id=node_id,
                            field=f"config.{field_name}",
                        )
                    )
                elif ref not in upstream:
                    problems.append(
                        Problem(
                            f"refers to node {ref!r}, which does not run before {node_id}",
                            node_id=node_id,
                            field=f"config.{field_name}",
                        )
                    )
        _check_references(node_id, config, ctx, problems)

    if problems:
        raise GraphInvalid(problems)
    return ValidGraph(
        definition=_canonical(definition.model_dump(), configs),
        nodes=nodes,
        configs=configs,
        graph=graph,
        settings=settings,
    )


def _canonical(definition: dict[str, Any], configs: dict[str, Any]) -> dict[str, Any]:
    """The definition as stored: reference ids in one spelling (lower-case, hyphenated),
    so lookups by id (is this credential in use?) can compare strings safely."""
    nodes_out = []
    for raw in definition["nodes"]:
        config = configs.get(str(raw.get("id"))) if isinstance(raw, dict) else None
        if config is not None and isinstance(raw.get("config"), dict):
            fixed = dict(raw["config"])
            for name in REFERENCE_FIELDS:
                value = getattr(config, name, None)
                if isinstance(value, uuid.UUID):
                    fixed[name] = str(value)
            raw = {**raw, "config": fixed}
        nodes_out.append(raw)
    return {**definition, "nodes": nodes_out}


def mcp_argument_problems(
    schema: dict[str, Any], arguments: dict[str, str]
) -> list[tuple[str, str]]:
    """What can be checked of templated arguments against a tool's input schema before
    they are rendered: required names present, no names the schema closes out. Values
    are checked against the whole schema at run time, once rendered."""
    out: list[tuple[str, str]] = []
    properties = schema.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    required = schema.get("required")
    for name in required if isinstance(required, list) else []:
        if isinstance(name, str) and name not in arguments:
            out.append((f"arguments.{name}", f"the tool requires argument {name!r}"))
    if schema.get("additionalProperties") is False:
        for name in arguments:
            if name not in properties:
                out.append((f"arguments.{name}", f"the tool takes no argument {name!r}"))
    return out


def _check_references(node_id: str, config: Any, ctx: Context, problems: list[Problem]) -> None:
    if (
        isinstance(config, N8nAction)
        and ctx.n8n_instance_ids is not None
        and config.instance_id not in ctx.n8n_instance_ids
    ):
        problems.append(
            Problem(
                "n8n instance not found in this workspace",
                node_id=node_id,
                field="config.instance_id",
            )
        )
    credential = getattr(config, "credential_id", None)
    if credential is not None and credential not in ctx.credential_ids:
        problems.append(
            Problem(
                "credential not found in this workspace",
                node_id=node_id,
                field="config.credential_id",
            )
        )
    if (
        isinstance(config, McpToolIntegration)
        and ctx.mcp_server_ids is not None
        and config.server_id not in ctx.mcp_server_ids
    ):
        problems.append(
            Problem(
                "MCP server not found in this workspace", node_id=node_id, field="config.server_id"
            )
        )
    elif isinstance(config, McpToolIntegration) and ctx.mcp_tools is not None:
        schema = ctx.mcp_tools.get((config.server_id, config.tool))
        if schema is None:
            problems.append(
                Problem(
                    f"tool {config.tool!r} is not offered by this MCP server (unknown, "
                    "removed, or changed and awaiting re-approval)",
                    node_id=node_id,
                    field="config.tool",
                )
            )
        else:
            for field_name, message in mcp_argument_problems(schema, config.arguments):
                problems.append(Problem(message, node_id=node_id, field=f"config.{field_name}"))
    if (
        isinstance(config, AgentConfig)
        and config.agent_id is not None
        and config.agent_id not in ctx.agent_ids
    ):
        problems.append(
            Problem("agent not found in this workspace", node_id=node_id, field="config.agent_id")
        )
    if isinstance(config, EventTrigger):
        if ctx.workflow_id is not None and config.workflow_id == ctx.workflow_id:
            problems.append(
                Problem(
                    "a workflow cannot be triggered by its own runs (it would loop)",
                    node_id=node_id,
                    field="config.workflow_id",
                )
            )
        elif ctx.workflow_id is not None and _recurses(
            config.workflow_id, ctx.workflow_id, ctx.event_sources
        ):
            # This workflow's runs would, through other event triggers, start its source
            # again: A -> B -> A, at any length.
            problems.append(
                Problem(
                    "event triggers would loop: this workflow's runs lead back to "
                    f"workflow {config.workflow_id}",
                    node_id=node_id,
                    field="config.workflow_id",
                )
            )
        else:
            _check_workflow_ref(node_id, config.workflow_id, ctx, problems, recursion=False)
    if (
        isinstance(config, SubWorkflowIntegration | ForEachLogic | WhileLogic)
        and config.workflow_id is not None
    ):
        _check_workflow_ref(node_id, config.workflow_id, ctx, problems, recursion=True)
    if isinstance(config, ForEachLogic | WhileLogic) and config.body is not None:
        for raw in config.body.nodes:
            kind = (
                raw.get("config", {}).get("kind") if isinstance(raw.get("config"), dict) else None
            )
            if kind in ("approval", "wait"):
                # A loop body runs inside its parent node's attempt, which cannot park.
                problems.append(
                    Problem(
                        f"a {kind} step cannot be inside a loop body, where nothing can "
                        "park the run: put it before or after the loop",
                        node_id=node_id,
                        field=f"config.body.{raw.get('id') or ''}".rstrip("."),
                    )
                )
            elif kind in ("for_each", "while") and raw.get("type") == "logic":
                # A body's nodes are checkpointed per pass of this loop only: a loop in
                # it would have nowhere to keep its own passes (and the engine does not
                # run one). A body workflow is a run per pass and may loop.
                problems.append(
                    Problem(
                        f"a {kind} loop cannot be inside a loop body: give this loop a "
                        "body workflow (config.workflow_id) that loops instead",
                        node_id=node_id,
                        field=f"config.body.{raw.get('id') or ''}".rstrip("."),
                    )
                )
        try:
            validate(
                config.body.model_dump(),
                ctx,
                require_trigger=False,
                extra_roots=LOOP_ROOTS[config.kind],
            )
        except GraphInvalid as exc:
            for p in exc.problems:
                problems.append(
                    Problem(
                        p.message,
                        node_id=node_id,
                        field=f"config.body.{p.node_id or ''}.{p.field or ''}".rstrip("."),
                    )
                )


def _check_workflow_ref(
    node_id: str, target: uuid.UUID, ctx: Context, problems: list[Problem], *, recursion: bool
) -> None:
    if target not in ctx.workflow_ids:
        problems.append(
            Problem(
                "workflow not found in this workspace", node_id=node_id, field="config.workflow_id"
            )
        )
        return
    if (
        recursion
        and ctx.workflow_id is not None
        and (target == ctx.workflow_id or _recurses(target, ctx.workflow_id, ctx.references))
    ):
        problems.append(
            Problem(
                "sub-workflow would call this workflow again (recursion)",
                node_id=node_id,
                field="config.workflow_id",
            )
        )
