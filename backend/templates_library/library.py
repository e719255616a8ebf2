"""The built-in templates, each built from the five primitives. A parameter is written
in the definition as the whole string "<<name>>" (replaced by its value, any JSON type)
or inside a longer string (replaced as text); instantiating validates the result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ParamKind = str  # "agent" | "credential" | "text" | "email" | "url" | "cron"


@dataclass(frozen=True)
class Parameter:
    name: str
    kind: ParamKind
    description: str
    required: bool = True
    default: Any = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "required": self.required,
            "default": self.default,
        }


@dataclass(frozen=True)
class Template:
    id: str
    name: str
    description: str
    category: str
    definition: dict[str, Any]
    parameters: list[Parameter] = field(default_factory=list)


def _node(node_id: str, node_type: str, label: str, **config: Any) -> dict[str, Any]:
    return {"id": node_id, "type": node_type, "label": label, "config": config}


def _edge(source: str, target: str, branch: str | None = None) -> dict[str, Any]:
    return {"source": source, "target": target, **({"branch": branch} if branch else {})}


AGENT = Parameter("agent", "agent", "The agent that does the thinking")
EMAIL = Parameter("email", "email", "Who is told (an email address)")

TEMPLATES: list[Template] = [
    Template(
        id="webhook-agent-notify",
        name="Webhook → agent → notify",
        description="A webhook call is read by an agent, whose summary is mailed.",
        category="agents",
        parameters=[AGENT, EMAIL],
        definition={
            "nodes": [
                _node("hook", "trigger", "Webhook", kind="webhook"),
                _node("think", "agent", "Summarise", agent_id="<<agent>>",
                      prompt="Summarise this event for a busy reader:\n{{ trigger | tojson }}"),
                _node("tell", "action", "Mail", kind="notify", channel="email", to="<<email>>",
                      subject="New event", message="{{ nodes.think.output.text }}"),
            ],
            "connections": [_edge("hook", "think"), _edge("think", "tell")],
        },
    ),
    Template(
        id="schedule-http-transform-file",
        name="Schedule → HTTP → transform → file",
        description="Fetches a JSON API on a schedule, keeps the fields you need, writes a file.",
        category="data",
        parameters=[
            Parameter("url", "url", "The API to fetch"),
            Parameter("cron", "cron", "When (5-field cron, UTC)", False, "0 * * * *"),
            Parameter("path", "text", "The file to write", False, "exports/latest.json"),
        ],
        definition={
            "nodes": [
                _node("tick", "trigger", "Schedule", kind="schedule", cron="<<cron>>"),
                _node("fetch", "action", "Fetch", kind="http_request", url="<<url>>"),
                _node("shape", "logic", "Keep the body", kind="transform",
                      template="{{ nodes.fetch.output.body | tojson }}"),
                _node("save", "action", "Write file", kind="file_write", path="<<path>>",
                      content="{{ nodes.shape.output | tojson }}"),
            ],
            "connections": [_edge("tick", "fetch"), _edge("fetch", "shape"),
                            _edge("shape", "save")],
        },
    ),
    Template(
        id="for-each-agent",
        name="For each item, ask an agent",
        description="Runs an agent once per item of the input list and collects the answers.",
        category="agents",
        parameters=[AGENT],
        definition={
            "nodes": [
                _node("start", "trigger", "Start with {items: [...]}", kind="manual"),
                _node("each", "logic", "For each item", kind="for_each", items="trigger['items']",
                      max_concurrency=4, body={"nodes": [
                          _node("ask", "agent", "Ask", agent_id="<<agent>>",
                                prompt="Handle this item: {{ item | tojson }}"),
                      ], "connections": []}),
                _node("collect", "logic", "Collect", kind="transform",
                      template="{{ nodes.each.output | tojson }}"),
            ],
            "connections": [_edge("start", "each"), _edge("each", "collect")],
        },
    ),
    Template(
        id="uptime-check",
        name="Uptime check with alert",
        description="Checks a URL every five minutes and mails when it does not answer 200.",
        category="operations",
        parameters=[Parameter("url", "url", "The URL to check"), EMAIL],
        definition={
            "nodes": [
                _node("tick", "trigger", "Every 5 minutes", kind="schedule", interval_s=300),
                _node("probe", "action", "Probe", kind="http_request", url="<<url>>",
                      timeout_s=10),
                _node("down", "logic", "Down?", kind="if",
                      condition="nodes.probe.output.status != 200"),
                _node("alert", "action", "Alert", kind="notify", channel="email", to="<<email>>",
                      subject="<<url>> is down",
                      message="Status {{ nodes.probe.output.status }}"),
            ],
            "connections": [_edge("tick", "probe"), _edge("probe", "down"),
                            _edge("down", "alert", "true")],
        },
    ),
    Template(
        id="webhook-router",
        name="Route webhook events by type",
        description="Forwards each webhook event to the URL for its type (switch).",
        category="integration",
        parameters=[
            Parameter("orders_url", "url", "Where order events go"),
            Parameter("other_url", "url", "Where every other event goes"),
        ],
        definition={
            "nodes": [
                _node("hook", "trigger", "Webhook", kind="webhook"),
                _node("route", "logic", "By type", kind="switch",
                      cases=[{"when": "trigger.type == 'order'", "branch": "orders"}]),
                _node("orders", "action", "Orders", kind="http_request", method="POST",
                      url="<<orders_url>>", body="{{ trigger | tojson }}"),
                _node("other", "action", "Other", kind="http_request", method="POST",
                      url="<<other_url>>", body="{{ trigger | tojson }}"),
            ],
            "connections": [_edge("hook", "route"), _edge("route", "orders", "orders"),
                            _edge("route", "other", "default")],
        },
    ),
    Template(
        id="authenticated-sync-with-fallback",
        name="Authenticated API sync with failure mail",
        description="Calls an API with a stored credential, retries transient failures, "
        "and mails when it still fails.",
        category="integration",
        parameters=[
            Parameter("url", "url", "The API to call"),
            Parameter("credential", "credential", "The credential for the API"),
            EMAIL,
        ],
        definition={
            "nodes": [
                _node("start", "trigger", "Start", kind="manual"),
                {**_node("sync", "action", "Sync", kind="http_request", method="POST",
                         url="<<url>>", credential_id="<<credential>>",
                         body="{{ trigger | tojson }}"),
                 "retry": {"max_retries": 5, "backoff_s": [2, 10, 30, 60, 120]},
                 "continue_on_error": True},
                _node("failed", "action", "Mail failure", kind="notify", channel="email",
                      to="<<email>>", subject="Sync failed",
                      message="The sync failed after its retries."),
            ],
            "connections": [_edge("start", "sync"), _edge("sync", "failed", "error")],
        },
    ),
    Template(
        id="research-then-write",
        name="Research, then write",
        description="One agent gathers notes on a topic, a second writes them up; "
        "the draft is saved as a file.",
        category="agents",
        parameters=[
            Parameter("researcher", "agent", "The agent that researches"),
            Parameter("writer", "agent", "The agent that writes"),
        ],
        definition={
            "nodes": [
                _node("start", "trigger", "Start with {topic}", kind="manual"),
                _node("research", "agent", "Research", agent_id="<<researcher>>",
                      prompt="Collect key facts about: {{ trigger.topic }}"),
                _node("write", "agent", "Write", agent_id="<<writer>>",
                      prompt="Write a short article from these notes:\n"
                      "{{ nodes.research.output.text }}"),
                _node("save", "action", "Save draft", kind="file_write",
                      path="drafts/{{ execution.id }}.md",
                      content="{{ nodes.write.output.text }}"),
            ],
            "connections": [_edge("start", "research"), _edge("research", "write"),
                            _edge("write", "save")],
        },
    ),
    Template(
        id="file-cleanup",
        name="Clean a JSON file",
        description="Reads a JSON file, keeps the records marked active, writes the result.",
        category="data",
        parameters=[
            Parameter("source", "text", "The JSON file to read", False, "imports/records.json"),
            Parameter("target", "text", "The file to write", False, "exports/active.json"),
        ],
        definition={
            "nodes": [
                _node("start", "trigger", "Start", kind="manual"),
                _node("read", "action", "Read", kind="file_read", path="<<source>>",
                      parse_json=True),
                _node("keep", "logic", "Keep active", kind="set", variables={
                    "active": "{{ nodes.read.output.content | selectattr('active') | list"
                              " | tojson }}",
                }),
                _node("write", "action", "Write", kind="file_write", path="<<target>>",
                      content="{{ vars.active | tojson }}"),
            ],
            "connections": [_edge("start", "read"), _edge("read", "keep"), _edge("keep", "write")],
        },
    ),
    Template(
        id="poll-until-ready",
        name="Poll until a job is ready",
        description="Checks a remote job until its status URL stops answering 202 "
        "Accepted (a bounded while loop).",
        category="operations",
        parameters=[Parameter("status_url", "url", "The job's status URL")],
        definition={
            "nodes": [
                _node("start", "trigger", "Start", kind="manual"),
                _node("wait", "logic", "Until done", kind="while", max_iterations=20,
                      condition="iteration == 0 or last.status == 202",
                      body={"nodes": [
                          _node("check", "action", "Check", kind="http_request",
                                url="<<status_url>>"),
                      ], "connections": []}),
            ],
            "connections": [_edge("start", "wait")],
        },
    ),
]  # fmt: skip

BY_ID = {t.id: t for t in TEMPLATES}


def substitute(value: Any, params: dict[str, Any]) -> Any:
    if isinstance(value, str):
        for name, given in params.items():
            token = f"<<{name}>>"
            if value == token:
                return given
            if token in value:
                value = value.replace(token, str(given))
        return value
    if isinstance(value, dict):
        return {k: substitute(v, params) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, params) for v in value]
    return value


def preview(definition: dict[str, Any]) -> dict[str, Any]:
    """The graph's shape for a picker: nodes with their kind and label, and edges."""
    return {
        "nodes": [
            {
                "id": n.get("id"),
                "type": n.get("type"),
                "kind": (n.get("config") or {}).get("kind"),
                "label": n.get("label"),
            }
            for n in definition.get("nodes", [])
            if isinstance(n, dict)
        ],
        "connections": definition.get("connections", []),
    }
