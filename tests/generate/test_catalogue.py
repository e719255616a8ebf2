"""The node catalogue, its strict spelling and decoding, and the deterministic repairs.
Pure: no server."""

from __future__ import annotations

from typing import Any

from backend.generate import catalogue
from backend.generate.repair import keep_ui_fields, repair
from backend.workflows import graph


def _objects(schema: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if isinstance(schema, dict):
        if schema.get("type") == "object":
            found.append(schema)
        for value in schema.values():
            found += _objects(value)
    elif isinstance(schema, list):
        for value in schema:
            found += _objects(value)
    return found


def test_every_validator_schema_is_in_the_catalogue() -> None:
    listed = {(n["type"], n["kind"]) for n in catalogue.catalogue()["nodes"]}
    for node_type, adapter in graph.CONFIG_ADAPTERS.items():
        schema = adapter.json_schema()
        members = schema.get("oneOf") or schema.get("anyOf")
        kinds = (
            {
                schema["$defs"][m["$ref"].split("/")[-1]]["properties"]["kind"]["const"]
                for m in members
            }
            if members
            else {None}
        )
        assert {(node_type, k) for k in kinds} <= listed
    defs = catalogue.document_schema()["$defs"]
    # The very schema the validator uses, not a copy kept by hand.
    assert defs["HttpRequestAction"] == graph.HttpRequestAction.model_json_schema(
        ref_template="#/$defs/{model}"
    )


def test_allowed_types_narrow_the_schema() -> None:
    doc = catalogue.document_schema(["trigger", "action"])
    types = {v["properties"]["type"]["const"] for v in doc["properties"]["nodes"]["items"]["anyOf"]}
    assert types == {"trigger", "action"}


def test_the_strict_schema_closes_every_object() -> None:
    strict = catalogue.strict_document_schema()
    objects = _objects(strict)
    assert objects
    assert all(o.get("additionalProperties") is False for o in objects)
    # No map survives as an open object: headers are entries, input_schema a string.
    http = strict["$defs"]["HttpRequestAction"]["properties"]
    assert http["headers"]["type"] == "array"
    manual = strict["$defs"]["ManualTrigger"]["properties"]["input_schema"]
    assert {"type": "string"} in [{"type": m.get("type")} for m in manual["anyOf"]]


def test_decode_turns_the_strict_spelling_back() -> None:
    schema = catalogue.document_schema()

    def node(node_id: str, node_type: str, **config: Any) -> dict[str, Any]:
        return {"id": node_id, "type": node_type, "config": config}

    inner = '{"id": "a", "type": "logic", "config": {"kind": "transform", "template": "x"}}'
    answer = {
        "name": "x",
        "nodes": [
            node("t", "trigger", kind="manual", input_schema='{"type": "object"}'),
            node(
                "h", "action", kind="http_request", url="u",
                headers=[{"key": "A", "value": "b"}], body="raw {{ trigger.x }}",
            ),
            node("s", "logic", kind="set", variables=[{"key": "n", "value": "1"}]),
            node("f", "logic", kind="for_each", items="trigger.xs", body={"nodes": [inner]}),
        ],
        "connections": [],
    }  # fmt: skip
    out = catalogue.decode(answer, schema)
    configs = {n["id"]: n["config"] for n in out["nodes"]}
    assert configs["t"]["input_schema"] == {"type": "object"}
    assert configs["h"]["headers"] == {"A": "b"}
    assert configs["h"]["body"] == "raw {{ trigger.x }}"
    assert configs["s"]["variables"] == {"n": "1"}
    assert configs["f"]["body"]["nodes"][0]["id"] == "a"
    # The plain spelling passes through unchanged.
    plain = {"nodes": [node("h", "action", kind="http_request", url="u", headers={"A": "b"})]}
    assert catalogue.decode(plain, schema) == plain


def test_repairs_drop_dangling_self_and_duplicate_edges_and_add_a_trigger() -> None:
    definition = {
        "nodes": [{"id": "a", "type": "action"}, {"id": "b", "type": "action"}],
        "connections": [
            {"source": "a", "target": "b"},
            {"source": "a", "target": "b"},
            {"source": "a", "target": "ghost"},
            {"source": "b", "target": "b"},
        ],
    }
    out, done = repair(definition)
    assert out["connections"] == [
        {"source": "start", "target": "a"},
        {"source": "a", "target": "b"},
    ]
    assert out["nodes"][0] == {"id": "start", "type": "trigger", "config": {"kind": "manual"}}
    assert len(done) == 4
    assert definition["connections"][2]["target"] == "ghost"  # the input is not changed


def test_a_trigger_is_not_added_twice_and_a_taken_id_is_avoided() -> None:
    with_trigger = {"nodes": [{"id": "t", "type": "trigger"}], "connections": []}
    assert repair(with_trigger) == (with_trigger, [])
    cyclic = {
        "nodes": [{"id": "start", "type": "action"}, {"id": "b", "type": "action"}],
        "connections": [{"source": "start", "target": "b"}, {"source": "b", "target": "start"}],
    }
    out, done = repair(cyclic)
    assert out["nodes"][0]["id"] == "start_2"
    assert {"source": "start_2", "target": "start"} in out["connections"]
    assert "feeding start" in done[0]


def test_an_edit_keeps_positions_and_labels() -> None:
    base = {"nodes": [{"id": "a", "position": {"x": 1}, "label": "A"}]}
    out = keep_ui_fields({"nodes": [{"id": "a"}, {"id": "b"}]}, base)
    assert out["nodes"] == [{"id": "a", "position": {"x": 1}, "label": "A"}, {"id": "b"}]
