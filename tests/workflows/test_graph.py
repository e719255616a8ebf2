"""The graph validator, pure: every rule, and where it points when it fails."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from jinja2.exceptions import SecurityError

from backend.workflows.graph import Context, GraphInvalid, validate
from backend.workflows.templates import environment

AGENT = uuid.uuid4()
CREDENTIAL = uuid.uuid4()
OTHER = uuid.uuid4()
SELF = uuid.uuid4()


def ctx(**kw: Any) -> Context:
    base: dict[str, Any] = {
        "workflow_id": SELF,
        "workflow_ids": frozenset({SELF, OTHER}),
        "agent_ids": frozenset({AGENT}),
        "credential_ids": frozenset({CREDENTIAL}),
    }
    base.update(kw)
    return Context(**base)


def node(id_: str, type_: str, **config: Any) -> dict[str, Any]:
    return {"id": id_, "type": type_, "config": config}


def edge(a: str, b: str, branch: str | None = None) -> dict[str, Any]:
    return {"source": a, "target": b, **({"branch": branch} if branch else {})}


def all_five() -> dict[str, Any]:
    return {
        "nodes": [
            {
                **node("start", "trigger", kind="manual"),
                "position": {"x": 1, "y": 2},
                "label": "Go",
            },
            node(
                "fetch",
                "action",
                kind="http_request",
                url="https://api.example.com/items/{{ trigger.id }}",
                credential_id=str(CREDENTIAL),
            ),
            node("check", "logic", kind="if", condition="nodes.fetch.output.status == 200"),
            node(
                "sum",
                "agent",
                agent_id=str(AGENT),
                prompt="Summarise {{ nodes.fetch.output.body }}",
            ),
            node(
                "route",
                "logic",
                kind="switch",
                cases=[{"when": "nodes.sum.output.score > 5", "branch": "high"}],
            ),
            node(
                "each",
                "logic",
                kind="for_each",
                items="nodes.fetch.output.body.items",
                body={
                    "nodes": [
                        node(
                            "shape",
                            "logic",
                            kind="transform",
                            template="{{ item.name }} #{{ index }}",
                        )
                    ]
                },
            ),
            node(
                "sub",
                "integration",
                kind="sub_workflow",
                workflow_id=str(OTHER),
                input={"x": "{{ nodes.sum.output.text }}"},
            ),
            node(
                "tool",
                "integration",
                kind="mcp_tool",
                server_id=str(uuid.uuid4()),
                tool="search",
                arguments={"q": "{{ vars.q }}"},
            ),
            node("join", "logic", kind="merge", mode="any"),
            node(
                "note",
                "action",
                kind="notify",
                channel="email",
                to="ops@example.com",
                message="done {{ execution.id }}",
            ),
        ],
        "connections": [
            edge("start", "fetch"),
            edge("fetch", "check"),
            edge("check", "sum", "true"),
            edge("check", "each", "false"),
            edge("sum", "route"),
            edge("route", "sub", "high"),
            edge("route", "tool", "default"),
            edge("sub", "join"),
            edge("tool", "join"),
            edge("each", "join"),
            edge("join", "note"),
        ],
        "settings": {"timeout_s": 600},
    }


def problems(definition: dict[str, Any], **kw: Any) -> list[tuple[str | None, str | None, str]]:
    with pytest.raises(GraphInvalid) as info:
        validate(definition, ctx(**kw))
    return [(p.node_id, p.field, p.message) for p in info.value.problems]


def test_a_graph_of_all_five_node_types_validates_and_keeps_ui_fields() -> None:
    valid = validate(all_five(), ctx())
    assert set(valid.graph.nodes) == {n["id"] for n in all_five()["nodes"]}
    assert valid.graph.edges["check", "sum"]["branch"] == "true"
    assert valid.definition["nodes"][0]["position"] == {"x": 1, "y": 2}
    assert valid.definition["nodes"][0]["label"] == "Go"
    assert valid.settings.timeout_s == 600


def test_duplicate_ids() -> None:
    d = {
        "nodes": [node("a", "trigger", kind="manual"), node("a", "logic", kind="merge")],
        "connections": [],
    }
    assert ("a", "id", "node id 'a' is used more than once") in problems(d)


def test_connection_to_a_missing_node() -> None:
    d = {"nodes": [node("a", "trigger", kind="manual")], "connections": [edge("a", "ghost")]}
    [(node_id, field, message)] = problems(d)
    assert (node_id, field) == ("ghost", "connections[0]")
    assert "missing node" in message


def test_a_cycle_is_named() -> None:
    d = {
        "nodes": [
            node("t", "trigger", kind="manual"),
            node("x", "logic", kind="merge"),
            node("y", "logic", kind="merge"),
        ],
        "connections": [edge("t", "x"), edge("x", "y"), edge("y", "x")],
    }
    [(_, field, message)] = problems(d)
    assert field == "connections"
    assert "x -> y -> x" in message or "y -> x -> y" in message


def test_branch_labels_must_exist_on_their_source() -> None:
    d = all_five()
    d["connections"][2] = edge("check", "sum", "maybe")
    assert (
        "check",
        "connections[2].branch",
        "branch 'maybe' does not exist on check (allowed: false, true)",
    ) in problems(d)
    d = all_five()
    d["connections"][0] = edge("start", "fetch", "true")
    assert problems(d)[0][:2] == ("start", "connections[0].branch")


def test_templates_and_conditions_must_parse() -> None:
    d = all_five()
    d["nodes"][2]["config"]["condition"] = "nodes.fetch.output.status =="
    d["nodes"][3]["config"]["prompt"] = "Summarise {{ nodes.fetch.output.body "
    found = problems(d)
    assert any(p[:2] == ("check", "config.condition") and "does not parse" in p[2] for p in found)
    assert any(p[:2] == ("sum", "config.prompt") and "does not parse" in p[2] for p in found)


def test_references_must_point_upstream() -> None:
    d = all_five()
    d["nodes"][1]["config"]["url"] = "https://x.example/{{ nodes.sum.output.text }}"
    assert (
        "fetch",
        "config.url",
        "refers to node 'sum', which does not run before fetch",
    ) in problems(d)
    d = all_five()
    d["nodes"][2]["config"]["condition"] = "nodes['nope'].ok"
    assert ("check", "config.condition", "refers to node 'nope', which does not exist") in problems(
        d
    )


def test_unknown_names_and_loop_names_outside_a_loop() -> None:
    d = all_five()
    d["nodes"][3]["config"]["prompt"] = "{{ secrets.key }}"
    assert any(
        p[:2] == ("sum", "config.prompt") and "unknown name 'secrets'" in p[2] for p in problems(d)
    )
    d = all_five()
    d["nodes"][3]["config"]["prompt"] = "{{ item }}"
    assert any(p[:2] == ("sum", "config.prompt") and "loop body" in p[2] for p in problems(d))


@pytest.mark.parametrize("inner_kind", ["for_each", "while"])
def test_a_loop_inside_a_loop_body_is_refused_where_it_stands(inner_kind: str) -> None:
    inner: dict[str, Any] = {"kind": inner_kind, "max_iterations": 3}
    inner.update({"items": "[1, 2]"} if inner_kind == "for_each" else {"condition": "index < 2"})
    inner["body"] = {"nodes": [node("t", "logic", kind="transform", template="1")]}
    d = {
        "nodes": [
            node("start", "trigger", kind="manual"),
            node(
                "outer", "logic", kind="for_each", items="[1, 2]",
                body={"nodes": [node("again", "logic", **inner)], "connections": []},
            ),
        ],
        "connections": [edge("start", "outer")],
    }  # fmt: skip
    found = [p for p in problems(d) if p[:2] == ("outer", "config.body.again")]
    assert found and "cannot be inside a loop body" in found[0][2], problems(d)


def test_a_workflow_needs_a_trigger_and_triggers_have_no_inputs() -> None:
    assert ("", "nodes") in [
        (p[0] or "", p[1]) for p in problems({"nodes": [node("a", "logic", kind="merge")]})
    ]
    d = {
        "nodes": [node("a", "trigger", kind="manual"), node("b", "trigger", kind="manual")],
        "connections": [edge("a", "b")],
    }
    assert problems(d)[0][:2] == ("b", "connections[0]")


def test_sub_workflow_references_stay_in_the_workspace_and_never_recurse() -> None:
    d = all_five()
    d["nodes"][6]["config"]["workflow_id"] = str(uuid.uuid4())
    assert ("sub", "config.workflow_id", "workflow not found in this workspace") in problems(d)
    d = all_five()
    d["nodes"][6]["config"]["workflow_id"] = str(SELF)
    assert any(p[:2] == ("sub", "config.workflow_id") and "recursion" in p[2] for p in problems(d))
    # OTHER calls SELF: calling OTHER from SELF would come back round.
    found = problems(all_five(), references=lambda wid: [SELF] if wid == OTHER else [])
    assert any(p[:2] == ("sub", "config.workflow_id") and "recursion" in p[2] for p in found)


def test_credentials_and_agents_must_exist_in_the_workspace() -> None:
    found = problems(all_five(), credential_ids=frozenset(), agent_ids=frozenset())
    assert ("fetch", "config.credential_id", "credential not found in this workspace") in found
    assert ("sum", "config.agent_id", "agent not found in this workspace") in found


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"kind": "schedule", "cron": "61 * * * *"}, "config.cron"),
        ({"kind": "schedule", "cron": "0 * * * *", "timezone": "Mars/Olympus"}, "config.timezone"),
        ({"kind": "teleport"}, "config.kind"),
        ({"kind": "manual", "surprise": 1}, "config.surprise"),
    ],
)
def test_trigger_configs_are_checked_with_their_field(config: dict[str, Any], field: str) -> None:
    found = problems({"nodes": [{"id": "t", "type": "trigger", "config": config}]})
    assert found[0][:2] == ("t", field), found


@pytest.mark.parametrize(
    ("type_", "config", "field"),
    [
        ("logic", {"kind": "while", "condition": "vars.go"}, "config.max_iterations"),
        ("logic", {"kind": "for_each", "items": "trigger.rows"}, "config.body"),
        (
            "logic",
            {"kind": "switch", "cases": [{"when": "true", "branch": "default"}]},
            "config.cases",
        ),
        ("action", {"kind": "http_request", "url": "https://x", "method": "BREW"}, "config.method"),
        ("action", {"kind": "notify", "channel": "email", "message": "hi"}, "config.to"),
        ("agent", {"prompt": "hi"}, "config.agent_id"),
        (
            "integration",
            {"kind": "mcp_tool", "server_id": "not-a-uuid", "tool": "x"},
            "config.server_id",
        ),
    ],
)
def test_node_configs_are_checked_with_their_field(
    type_: str, config: dict[str, Any], field: str
) -> None:
    d = {
        "nodes": [
            node("t", "trigger", kind="manual"),
            {"id": "n", "type": type_, "config": config},
        ],
        "connections": [edge("t", "n")],
    }
    found = problems(d)
    assert found[0][:2] == ("n", field), found


def test_for_each_body_is_validated_with_item_in_scope() -> None:
    d = all_five()
    d["nodes"][5]["config"]["body"]["nodes"][0]["config"]["template"] = "{{ item.name }"
    assert any(
        p[0] == "each" and p[1] and p[1].startswith("config.body.shape") for p in problems(d)
    )


def test_the_sandbox_refuses_attribute_escapes_at_render_time() -> None:
    template = environment.from_string("{{ ''.__class__.__mro__ }}")
    with pytest.raises(SecurityError):
        template.render()
    with pytest.raises(SecurityError):
        environment.from_string("{{ vars.append(1) }}").render(vars=[])


@pytest.mark.parametrize(
    "source",
    [
        "nodes['b' ~ ''].x",
        "nodes|attr('fetch')",
        "nodes|dictsort",
        "(" * 300 + "1" + ")" * 300,
        "1) }}{{ nodes.fetch",
    ],
)
def test_conditions_that_hide_their_reads_or_escape_are_refused(source: str) -> None:
    d = all_five()
    d["nodes"][2]["config"]["condition"] = source
    assert any(p[:2] == ("check", "config.condition") for p in problems(d))


@pytest.mark.parametrize(
    "source",
    [
        "{% set n = nodes %}{{ n.fetch }}",
        "{% set trigger = nodes %}{{ trigger.fetch }}",
        "{% for n in nodes %}{{ n }}{% endfor %}",
        "{% include 'x' %}",
        "{% import 'x' as y %}",
        "{% if 1 %}" * 400 + "x" + "{% endif %}" * 400,
        "x" * 30_000,
    ],
)
def test_templates_that_hide_their_reads_or_reach_outside_are_refused(source: str) -> None:
    d = all_five()
    d["nodes"][3]["config"]["prompt"] = source
    assert any(p[:2] == ("sum", "config.prompt") for p in problems(d))


def test_loop_inside_a_for_and_json_bodies_are_checked() -> None:
    d = all_five()
    d["nodes"][3]["config"]["prompt"] = (
        "{% for r in nodes.fetch.output.rows %}{{ loop.index }}{% endfor %}"
    )
    validate(d, ctx())
    d["nodes"][1]["config"]["body"] = {"q": ["{{ nodes.sum.output }}"]}
    assert (
        "fetch",
        "config.body.q[0]",
        "refers to node 'sum', which does not run before fetch",
    ) in problems(d)


def test_huge_values_are_refused_fast_at_render_time() -> None:
    for source in ("{{ 'x' * 10**10 }}", "{{ 2 ** 100000 }}", "{{ [1] * 100000000 }}"):
        with pytest.raises(SecurityError):
            environment.from_string(source).render()


@pytest.mark.parametrize("cron", ["*/5 * * * * *", "0 0 31 2 *", "@reboot"])
def test_crons_must_have_five_fields_and_fire(cron: str) -> None:
    found = problems({"nodes": [node("t", "trigger", kind="schedule", cron=cron)]})
    assert found[0][:2] == ("t", "config.cron"), found


def test_a_workflow_cannot_trigger_itself() -> None:
    found = problems({"nodes": [node("t", "trigger", kind="event", workflow_id=str(SELF))]})
    assert found[0][:2] == ("t", "config.workflow_id")


def test_reference_ids_are_stored_in_one_spelling() -> None:
    d = all_five()
    d["nodes"][1]["config"]["credential_id"] = CREDENTIAL.hex.upper()
    stored = validate(d, ctx()).definition
    assert stored["nodes"][1]["config"]["credential_id"] == str(CREDENTIAL)


def test_mcp_servers_are_checked_once_known() -> None:
    found = problems(all_five(), mcp_server_ids=frozenset())
    assert any(p[:2] == ("tool", "config.server_id") for p in found)
