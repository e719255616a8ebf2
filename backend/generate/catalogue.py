"""The node catalogue as JSON Schema, built from the very pydantic schemas the graph
validator uses (`graph.CONFIG_ADAPTERS`, `graph.Node`), so a node type or option added
there is offered to the model and listed by `GET /catalogue` with no change here.

Two spellings of one schema:
- `catalogue()`: faithful JSON Schema, for people and for non-strict tool input;
- `strict_document_schema()`: the same, rewritten into what strict tool input accepts
  (every object closed, no free-form maps). A map `{str: X}` becomes a list of
  `{key, value}` entries and a free-form object a JSON-encoded string; `decode()` turns
  the model's answer back into the validator's shape, whichever spelling it used.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter

from backend.kit.lazy import lazy_module
from backend.workflows import graph

if TYPE_CHECKING:
    import anthropic
else:
    # Imported on first use: see backend/kit/lazy.py.
    anthropic = lazy_module("anthropic")

Schema = dict[str, Any]
REF = "#/$defs/"
NODE_FIELDS = ("retry", "timeout_s", "continue_on_error", "label")
FREE_FORM = "A JSON object, written as a JSON-encoded string."


def _merge_defs(into: Schema, defs: Schema) -> None:
    for name, schema in defs.items():
        if name in into and into[name] != schema:
            # Two config classes with one name would make references ambiguous.
            raise RuntimeError(f"two node schemas are both named {name!r}")
        into[name] = schema


def _variants(node_type: str, adapter: TypeAdapter[Any], defs: Schema) -> list[dict[str, Any]]:
    """One entry per (type, kind): a discriminated union lists its members."""
    schema = adapter.json_schema(ref_template=REF + "{model}")
    _merge_defs(defs, schema.pop("$defs", {}))
    members = schema.get("oneOf") or schema.get("anyOf")
    out: list[dict[str, Any]] = []
    if members:
        for member in members:
            name = member["$ref"].removeprefix(REF)
            kind = defs[name].get("properties", {}).get("kind", {}).get("const")
            out.append({"type": node_type, "kind": kind, "config": {"$ref": member["$ref"]}})
    else:
        title = schema.get("title") or f"{node_type.title()}Config"
        defs.setdefault(title, schema)
        out.append({"type": node_type, "kind": None, "config": {"$ref": REF + title}})
    return out


def _description(defs: Schema, ref: str) -> str:
    return str(defs.get(ref.removeprefix(REF), {}).get("description") or "").strip()


@cache
def _built() -> tuple[Schema, tuple[dict[str, Any], ...]]:
    defs: Schema = {}
    variants: list[dict[str, Any]] = []
    for node_type, adapter in graph.CONFIG_ADAPTERS.items():
        variants += _variants(node_type, adapter, defs)
    node = graph.Node.model_json_schema(ref_template=REF + "{model}")
    _merge_defs(defs, node.pop("$defs", {}))
    for v in variants:
        fields: Schema = {
            "id": node["properties"]["id"],
            "type": {"const": v["type"]},
            "config": v["config"],
            **{f: node["properties"][f] for f in NODE_FIELDS if f in node["properties"]},
        }
        title = f"{v['type']}.{v['kind']}" if v["kind"] else v["type"]
        v["schema"] = {
            "type": "object",
            "title": title,
            "description": _description(defs, v["config"]["$ref"]),
            "properties": fields,
            "required": ["id", "type", "config"],
            "additionalProperties": False,
        }
    connection = graph.Connection.model_json_schema()
    connection["description"] = (
        "An edge source -> target. `branch` only on edges leaving an if (true/false), a "
        "switch (its case labels or default), or a node with continue_on_error (error)."
    )
    defs["Connection"] = connection
    settings = graph.WorkflowSettings.model_json_schema(ref_template=REF + "{model}")
    _merge_defs(defs, settings.pop("$defs", {}))
    defs["WorkflowSettings"] = settings
    return defs, tuple(variants)


def node_types() -> list[str]:
    return list(graph.CONFIG_ADAPTERS)


def catalogue(allowed_types: list[str] | None = None) -> Schema:
    """Every node variant with its JSON Schema, plus the schema of a whole document."""
    defs, variants = _built()
    chosen = [v for v in variants if allowed_types is None or v["type"] in allowed_types]
    return {
        "node_types": sorted({v["type"] for v in chosen}),
        "nodes": [
            {"type": v["type"], "kind": v["kind"], "description": v["schema"]["description"]}
            for v in chosen
        ],
        "schema": document_schema(allowed_types),
        "$defs_count": len(defs),
    }


def document_schema(allowed_types: list[str] | None = None) -> Schema:
    """The JSON Schema of what the model submits: a name, nodes, connections, settings."""
    defs, variants = _built()
    chosen = [v for v in variants if allowed_types is None or v["type"] in allowed_types]
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "description": "A short name for the workflow"},
            "description": {"type": "string", "description": "One or two sentences"},
            "nodes": {"type": "array", "items": {"anyOf": [v["schema"] for v in chosen]}},
            "connections": {"type": "array", "items": {"$ref": REF + "Connection"}},
            "settings": {"$ref": REF + "WorkflowSettings"},
            "notes": {
                "type": "string",
                "description": "Assumptions you made and anything the user must fill in",
            },
        },
        "required": ["name", "nodes", "connections"],
        "additionalProperties": False,
        "$defs": copy.deepcopy(defs),
    }


# Strict spelling -------------------------------------------------------------------------


def _is_map(schema: Schema) -> bool:
    return schema.get("type") == "object" and not schema.get("properties")


def _strictable(schema: Any) -> Any:
    """Free-form maps rewritten into shapes strict tool input can express."""
    if isinstance(schema, list):
        return [_strictable(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if _is_map(schema):
        extra = schema.get("additionalProperties", True)
        if isinstance(extra, dict) and extra:
            return {
                "type": "array",
                "description": (schema.get("description", "") + " Entries of a map.").strip(),
                "items": {
                    "type": "object",
                    "properties": {"key": {"type": "string"}, "value": _strictable(extra)},
                    "required": ["key", "value"],
                    "additionalProperties": False,
                },
            }
        return {"type": "string", "description": FREE_FORM}
    out = {key: _strictable(value) for key, value in schema.items()}
    for union in ("anyOf", "oneOf"):
        if union in out:
            # `str | dict` would become `str | str`: the plain string already covers it.
            members = out[union]
            if {"type": "string"} in members:
                members = [m for m in members if m.get("description") != FREE_FORM]
            out[union] = members
    out.pop("discriminator", None)
    return out


def strict_document_schema(allowed_types: list[str] | None = None) -> Schema:
    return anthropic.transform_schema(_strictable(document_schema(allowed_types)))


# Decoding --------------------------------------------------------------------------------


def _resolve(schema: Schema, defs: Schema) -> Schema:
    while "$ref" in schema:
        schema = defs.get(str(schema["$ref"]).removeprefix(REF), {})
    return schema


def _fits(value: Any, schema: Schema, defs: Schema) -> bool:
    schema = _resolve(schema, defs)
    if "const" in schema:
        return bool(value == schema["const"])
    kind = schema.get("properties", {}).get("kind", {}).get("const")
    node_type = schema.get("properties", {}).get("type", {}).get("const")
    if isinstance(value, dict) and kind is not None:
        return bool(value.get("kind") == kind)
    if isinstance(value, dict) and node_type is not None:
        # A node variant: its type, and its config's kind when the type has kinds.
        config = value.get("config")
        ref = schema["properties"].get("config", {})
        return value.get("type") == node_type and (
            not isinstance(config, dict) or _fits(config, ref, defs)
        )
    expected = schema.get("type")
    python = {
        "object": dict, "array": list, "string": str, "boolean": bool,
        "integer": int, "number": (int, float), "null": type(None),
    }  # fmt: skip
    if isinstance(expected, str) and expected in python:
        if isinstance(value, bool) and expected in ("integer", "number"):
            return False
        return bool(isinstance(value, python[expected]))  # type: ignore[arg-type]
    return True


def decode(value: Any, schema: Schema, defs: Schema | None = None) -> Any:
    """The model's answer in the validator's shape (map entries and JSON strings back to
    objects). Anything that does not decode is left as it is, for the validator."""
    if defs is None:
        defs = schema.get("$defs", {})
    schema = _resolve(schema, defs)
    members = schema.get("anyOf") or schema.get("oneOf")
    if members:
        for member in members:
            if _fits(value, member, defs):
                return decode(value, member, defs)
        for member in members:
            decoded = decode(value, member, defs)
            if decoded is not value:
                return decoded
        return value
    if _is_map(schema):
        extra = schema.get("additionalProperties", True)
        inner = extra if isinstance(extra, dict) else {}
        if isinstance(value, list) and all(isinstance(e, dict) and "key" in e for e in value):
            return {str(e["key"]): decode(e.get("value"), inner, defs) for e in value}
        if isinstance(value, str) and not isinstance(extra, dict):
            try:
                parsed = json.loads(value)
            except ValueError:
                return value
            return parsed if isinstance(parsed, dict) else value
        if isinstance(value, dict) and inner:
            return {k: decode(v, inner, defs) for k, v in value.items()}
        return value
    if isinstance(value, dict) and schema.get("properties"):
        props = schema["properties"]
        return {k: decode(v, props[k], defs) if k in props else v for k, v in value.items()}
    if isinstance(value, list) and schema.get("type") == "array":
        items = schema.get("items") or {}
        return [decode(item, items, defs) for item in value]
    return value
