"""The OpenAPI document as the API really answers: one error body for every error
status, and on each operation the error statuses it can give.

FastAPI documents its own 422 body (`detail` as a list) on every operation and nothing
else; every error here is `{error, detail, request_id, field?, fields?}` (main.py's
handlers and the request middleware), so the document is rewritten once, when first
asked for. Which statuses an operation declares follows from what it is:

- every operation: 422 (path, query and header values are checked at the edge);
- every operation under the API prefix: 429 (rate limits) and 503 (a backing service
  did not answer);
- signed-in operations: 401, 403 and 404 (a workspace you are not in is not found);
- operations with path parameters: 404;
- writes (POST, PUT, PATCH, DELETE): 409 and 413, and 401 on the public ones too
  (sign-in codes, refresh tokens, signed webhooks);
- anything a route adds with `responses=` (402, 424, 502 where they can happen).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.routing import compile_path

ERROR_REF = {"$ref": "#/components/schemas/Error"}

ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "description": "The body of every error answer.",
    "required": ["error", "detail", "request_id"],
    "properties": {
        "error": {
            "type": "string",
            "description": "A stable code: validation_error, not_found, conflict, …",
        },
        "detail": {"type": "string", "description": "What went wrong, for a person."},
        "request_id": {
            "type": "string",
            "description": "The X-Request-ID of the request, to find it in the logs.",
        },
        "field": {"type": "string", "description": "The input the error is about."},
        "fields": {
            "type": "array",
            "description": "validation_error: every input that was refused.",
            "items": {"$ref": "#/components/schemas/FieldError"},
        },
    },
    # Some codes add context (a conflict's constraint, a readiness check's results).
    "additionalProperties": True,
}

FIELD_ERROR_SCHEMA: dict[str, Any] = {
    "title": "FieldError",
    "type": "object",
    "required": ["field", "in", "message"],
    "properties": {
        "field": {"type": "string", "description": "Dotted path: nodes[2].config.url"},
        "in": {
            "anyOf": [
                {"type": "string", "enum": ["body", "query", "path", "header", "cookie"]},
                {"type": "null"},
            ]
        },
        "message": {"type": "string"},
        "type": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
}

DESCRIPTIONS = {
    400: "Bad request",
    401: "Missing, invalid or expired credentials",
    402: "A budget or quota is spent",
    403: "Not allowed to do this",
    404: "Not found, or not yours to see",
    409: "Conflicts with the current state",
    413: "Request body too large",
    422: "Validation error: `fields` names each refused input",
    424: "A needed setting is not configured",
    429: "Rate limited: retry after `Retry-After` seconds",
    502: "An upstream service answered with an error",
    503: "A backing service did not answer: retry later",
}
RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds until a request may succeed",
        "schema": {"type": "integer"},
    }
}
WRITES = {"post", "put", "patch", "delete"}
# FastAPI's own validation schemas, which no answer uses.
_UNUSED = ("HTTPValidationError", "ValidationError")


def _statuses(path: str, method: str, operation: dict[str, Any], api_prefix: str) -> set[int]:
    statuses = {422}
    signed_in = bool(operation.get("security"))
    if path.startswith(api_prefix):
        statuses |= {429, 503}
    if signed_in:
        statuses |= {401, 403, 404}
    if "{" in path:
        statuses.add(404)
    if method in WRITES:
        statuses |= {409, 413}
        if path.startswith(api_prefix):
            statuses.add(401)
    return statuses


def error_response(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": DESCRIPTIONS.get(status, "Error"),
        "content": {"application/json": {"schema": ERROR_REF}},
    }
    if status == 429:
        response["headers"] = RETRY_AFTER
    return response


def rewrite(schema: dict[str, Any], api_prefix: str) -> dict[str, Any]:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in _UNUSED:
        components.pop(name, None)
    components["Error"] = ERROR_SCHEMA
    components["FieldError"] = FIELD_ERROR_SCHEMA
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if method not in WRITES | {"get", "head", "options"}:
                continue
            responses: dict[str, Any] = operation.setdefault("responses", {})
            wanted = {int(code) for code in responses if code.isdigit() and int(code) >= 400}
            for status in wanted | _statuses(path, method, operation, api_prefix):
                declared = responses.get(str(status), {})
                # A route's own body schema for an error status stays; a description
                # alone (or FastAPI's 422) gets the real error body.
                content = declared.get("content", {}).get("application/json", {})
                ref = content.get("schema", {}).get("$ref", "")
                if content and not ref.endswith("/HTTPValidationError"):
                    continue
                merged = error_response(status)
                if declared.get("description") and str(status) != "422":
                    merged["description"] = declared["description"]
                responses[str(status)] = merged
            operation["responses"] = dict(sorted(responses.items()))
    return schema


def allowed_methods(app: FastAPI, path: str) -> str | None:
    """The `Allow` of a 405: the methods the document lists for every path template the
    request path matches (Starlette names only the first matching route's, and a path
    is often served by several routes)."""
    table: list[tuple[Any, set[str]]] | None = getattr(app.state, "allow_table", None)
    if table is None:
        table = [
            (compile_path(template)[0], {m.upper() for m in item if m in WRITES | {"get"}})
            for template, item in app.openapi().get("paths", {}).items()
        ]
        app.state.allow_table = table
    methods = {m for regex, listed in table if regex.match(path) for m in listed}
    return ", ".join(sorted(methods)) or None


def install(app: FastAPI, api_prefix: str) -> None:
    """Replace `app.openapi` with one that builds the rewritten document once."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = rewrite(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    openapi_version=app.openapi_version,
                    description=app.description,
                    routes=app.routes,
                ),
                api_prefix,
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
