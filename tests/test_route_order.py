"""The API's routers are included hot routes first (backend/main.py, issue 20): FastAPI
tries routes in order, so the order decides which route answers a path two of them
could match. Each route must still be the one that answers its own paths."""

from __future__ import annotations

import re
import uuid
from typing import Any

from fastapi.routing import APIRoute, _IncludedRouter
from starlette.routing import BaseRoute, Match

from backend.main import app

SAMPLE = str(uuid.UUID(int=7))


def _routes(routes: list[BaseRoute], prefix: str = "") -> list[tuple[str, APIRoute]]:
    """(full path, route) of every API route, in the order FastAPI tries them."""
    out: list[tuple[str, APIRoute]] = []
    for route in routes:
        if isinstance(route, _IncludedRouter):
            inner = prefix + route.include_context.prefix
            out.extend(_routes(route.original_router.routes, inner))
        elif isinstance(route, APIRoute):
            out.append((prefix + route.path, route))
    return out


def _answering(routes: list[BaseRoute], scope: dict[str, Any]) -> BaseRoute | None:
    """The route FastAPI would hand the request to: the first full match, in order
    (an included router's own `_match` says which of its routes that is)."""
    for route in routes:
        found: Any
        if isinstance(route, _IncludedRouter):
            match, _, found, _ = route._match(scope)
            if match == Match.FULL and isinstance(found, _IncludedRouter):
                found = _answering([found], scope)
        else:
            match, _ = route.matches(scope)
            found = route
        if match == Match.FULL:
            answer: BaseRoute | None = found
            return answer
    return None


def test_every_api_route_answers_its_own_paths() -> None:
    checked = 0
    wrong = []
    for template, route in _routes(app.router.routes):
        # Every parameter as an id: no literal segment of another route matches it.
        path = re.sub(r"\{[^}]+\}", SAMPLE, template)
        for method in sorted(route.methods or ()):
            if method == "HEAD":
                continue
            scope = {"type": "http", "method": method, "path": path, "root_path": ""}
            found = _answering(app.router.routes, scope)
            checked += 1
            if found is not route:
                wrong.append((method, template, getattr(found, "path", found)))
    assert wrong == []
    assert checked > 150


def test_the_hot_routes_come_first() -> None:
    order = [path for path, _ in _routes(app.router.routes)]
    hot = order.index("/api/v1/executions")
    assert hot < order.index("/api/v1/auth/me") and hot < order.index("/api/v1/workspaces")
    assert order.index("/api/v1/workflows/generate") < order.index(
        "/api/v1/workflows/{workflow_id}"
    )
