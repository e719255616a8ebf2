"""n8n's own OpenAPI spec (the part our client uses, cut from the npm package by
trim_spec.py) as JSON Schema validators: what the stand-in answers and what a real n8n
answers are both checked against it.

OpenAPI 3.0's `nullable: true` becomes an explicit null alternative; descriptive keys
JSON Schema does not know are dropped; `$ref`s resolve inside the same document."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.n8n.trim_spec import OUT

URI = "urn:n8n-openapi"
DROP = {"example", "examples", "readOnly", "writeOnly", "deprecated", "discriminator", "xml",
        "style", "explode"}  # fmt: skip


def _convert(node: Any) -> Any:
    if isinstance(node, list):
        return [_convert(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _convert(v) for k, v in node.items() if k not in DROP}
    if isinstance(out.get("$ref"), str) and out["$ref"].startswith("#/"):
        out["$ref"] = URI + out["$ref"]
    if out.pop("nullable", False):
        return {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(OUT.read_text())
    return loaded


@cache
def _registry() -> Registry[Any]:
    converted = _convert(document())
    registry: Registry[Any] = Registry().with_resource(
        URI, Resource.from_contents(converted, DRAFT202012)
    )
    return registry


def _operation(path: str, method: str) -> dict[str, Any]:
    op: dict[str, Any] = document()["paths"][path][method.lower()]
    return op


def response_schema(path: str, method: str, status: int) -> dict[str, Any] | None:
    """The JSON schema of that answer, or None when the spec gives it no body."""
    responses = _operation(path, method)["responses"]
    entry = responses.get(str(status))
    if entry is None:
        raise KeyError(f"the spec has no {status} answer for {method.upper()} {path}")
    if "$ref" in entry:
        _, _, section, name = entry["$ref"].split("/", 3)
        entry = document()["components"][section][name]
    content = (entry.get("content") or {}).get("application/json")
    if not content:
        return None
    schema: dict[str, Any] = _convert(content["schema"])
    return schema


def request_schema(path: str, method: str) -> dict[str, Any] | None:
    body = _operation(path, method).get("requestBody")
    if not body:
        return None
    schema: dict[str, Any] = _convert(body["content"]["application/json"]["schema"])
    return schema


def violations(schema: dict[str, Any] | None, value: Any) -> list[str]:
    if schema is None:
        return []
    validator = Draft202012Validator(schema, registry=_registry())
    return [
        f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message[:300]}"
        for e in validator.iter_errors(value)
    ]


def check_answer(path: str, method: str, status: int, body: Any) -> list[str]:
    """What in an answer breaks the spec (empty: it follows it)."""
    try:
        schema = response_schema(path, method, status)
    except KeyError as exc:
        return [str(exc)]
    return violations(schema, body)


def properties(path: str, method: str, status: int, *pointer: str) -> set[str]:
    """The property names the spec lists at `pointer` (e.g. "data", "items") of an answer."""
    schema: Any = response_schema(path, method, status)
    for step in pointer:
        schema = schema["properties"][step] if step != "items" else schema["items"]
    if "anyOf" in schema:
        schema = schema["anyOf"][0]
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        schema = _convert(document()["components"]["schemas"][name])
    return set(schema.get("properties", {}))
