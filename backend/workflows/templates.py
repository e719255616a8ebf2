"""Templates and conditions: Jinja2's sandboxed environment, parsed here and rendered
by the engine, never `eval`. Parsing also tells which nodes an expression reads, so the
validator can insist they run before it.

Context names an expression may use: `trigger`, `nodes`, `vars`, `execution`, and inside
a for_each body `item` and `index`. Secrets are never in the context.
"""

from __future__ import annotations

from dataclasses import dataclass

from jinja2 import TemplateSyntaxError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

CONTEXT_ROOTS = frozenset({"trigger", "nodes", "vars", "execution", "item", "index", "loop"})

# Immutable: a template cannot even call list.append on the data it is given.
environment = ImmutableSandboxedEnvironment(autoescape=False)


class ExpressionError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Parsed:
    node_refs: frozenset[str]
    roots: frozenset[str]


def _analyse(ast: nodes.Template) -> Parsed:
    refs: set[str] = set()
    roots: set[str] = set()
    assigned = {n.name for n in ast.find_all(nodes.Name) if n.ctx in ("store", "param")}
    for name in ast.find_all(nodes.Name):
        if name.ctx == "load" and name.name not in assigned:
            roots.add(name.name)
    for attr in ast.find_all(nodes.Getattr):
        if isinstance(attr.node, nodes.Name) and attr.node.name == "nodes":
            refs.add(attr.attr)
    for item in ast.find_all(nodes.Getitem):
        is_nodes = isinstance(item.node, nodes.Name) and item.node.name == "nodes"
        if is_nodes and isinstance(item.arg, nodes.Const) and isinstance(item.arg.value, str):
            refs.add(item.arg.value)
    return Parsed(node_refs=frozenset(refs), roots=frozenset(roots))


def _check_roots(parsed: Parsed) -> None:
    unknown = sorted(parsed.roots - CONTEXT_ROOTS - set(environment.globals))
    if unknown:
        raise ExpressionError(
            f"unknown name {unknown[0]!r}; use one of {', '.join(sorted(CONTEXT_ROOTS))}"
        )


def parse_template(source: str) -> Parsed:
    try:
        parsed = _analyse(environment.parse(source))
    except TemplateSyntaxError as exc:
        raise ExpressionError(
            f"template does not parse (line {exc.lineno}): {exc.message}"
        ) from exc
    _check_roots(parsed)
    return parsed


def parse_expression(source: str) -> Parsed:
    """A condition such as `nodes.fetch.output.status == 200`."""
    if "{{" in source or "{%" in source:
        raise ExpressionError("a condition is a bare expression, without {{ }}")
    try:
        parsed = _analyse(environment.parse("{{ (" + source + ") }}"))
    except TemplateSyntaxError as exc:
        raise ExpressionError(f"expression does not parse: {exc.message}") from exc
    _check_roots(parsed)
    return parsed
