"""Cut n8n's shipped OpenAPI spec down to the operations our client uses (and every
component they refer to), as JSON: `python -m tests.n8n.trim_spec <openapi.yml>`.

The whole bundled spec is ~750 KB of YAML; the stand-in and the contract tests need only
these paths. Run again against a new n8n's `dist/public-api/v1/openapi.yml` to move the
contract to that version (the file name carries the version)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent
VERSION = "2.41.1"
OUT = HERE / f"n8n-openapi-{VERSION}.json"
PATHS = {
    "/workflows": ["get", "post"],
    "/workflows/{workflowId}": ["get", "put", "delete"],
    "/workflows/{workflowId}/publish": ["post"],
    "/workflows/{workflowId}/unpublish": ["post"],
    "/workflows/{workflowId}/activate": ["post"],
    "/workflows/{workflowId}/deactivate": ["post"],
    "/executions": ["get"],
    "/executions/{executionId}": ["get"],
    "/executions/{executionId}/retry": ["post"],
    "/tags": ["get"],
    # Promotions map credentials by name and type (listing needs credential:list).
    "/credentials": ["get", "post"],
}


def _refs(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/"):
            found.add(ref)
        for value in node.values():
            _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)


def trim(spec: dict[str, Any]) -> dict[str, Any]:
    paths = {p: {m: spec["paths"][p][m] for m in methods} for p, methods in PATHS.items()}
    components: dict[str, dict[str, Any]] = {}
    pending: set[str] = set()
    _refs(paths, pending)
    seen: set[str] = set()
    while pending:
        ref = pending.pop()
        if ref in seen:
            continue
        seen.add(ref)
        _, _, section, name = ref.split("/", 3)
        body = spec["components"][section][name]
        components.setdefault(section, {})[name] = body
        _refs(body, pending)
    components["securitySchemes"] = spec["components"]["securitySchemes"]
    return {
        "openapi": spec["openapi"],
        "info": {**spec["info"], "x-n8n-version": VERSION},
        "servers": spec.get("servers", []),
        "security": spec.get("security", []),
        "paths": paths,
        "components": components,
    }


def main(source: str) -> None:
    spec = yaml.safe_load(Path(source).read_text())
    OUT.write_text(json.dumps(trim(spec), indent=1, sort_keys=True, default=str) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1])
