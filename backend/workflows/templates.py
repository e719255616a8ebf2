"""Templates and conditions: Jinja2's sandboxed environment, parsed here and rendered
by the engine, never `eval`. Parsing also tells which nodes an expression reads, so the
validator can insist they run before it.

Context names an expression may use: `trigger`, `nodes`, `vars`, `execution`, and inside
a for_each body `item` and `index` (`loop` inside a `{% for %}`). Secrets are never in
the context. `nodes` may only be read as `nodes.<id>` or `nodes['<id>']`, so every read
of another node's output is visible to the validator.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from jinja2 import Template, TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOTS = frozenset({"trigger", "nodes", "vars", "execution"})
LOOP_ROOTS = frozenset({"item", "index", "iteration", "last"})
CONTEXT_ROOTS = ROOTS | LOOP_ROOTS | {"loop"}
MAX_SOURCE_CHARS = 20_000
# Render-time bounds on the two operators that can build huge values from tiny input.
MAX_REPEAT_CHARS = 1_000_000
MAX_EXPONENT = 512
FORBIDDEN_TAGS = (
    nodes.Include,
    nodes.Import,
    nodes.FromImport,
    nodes.Extends,
    nodes.Macro,
    nodes.CallBlock,
)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox (a template cannot even call list.append on its data),
    with `*` and `**` bounded so `'x' * 10**10` or `9**9**9` fail fast."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
                raise SecurityError(f"exponent larger than {MAX_EXPONENT}")
            return left**right
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                repeats = isinstance(seq, str | list | tuple) and isinstance(times, int)
                if repeats and len(seq) * times > MAX_REPEAT_CHARS:
                    raise SecurityError(f"result longer than {MAX_REPEAT_CHARS}")
            return left * right
        return super().call_binop(context, operator, left, right)


environment = BoundedSandbox(autoescape=False)


class ExpressionError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Parsed:
    node_refs: frozenset[str]
    roots: frozenset[str]


def _analyse(tree: nodes.Node) -> Parsed:
    for tag in FORBIDDEN_TAGS:
        found = next(iter(tree.find_all(tag)), None)
        if found is not None:
            raise ExpressionError(f"{type(found).__name__.lower()} is not available in templates")
    stored = {n.name for n in tree.find_all(nodes.Name) if n.ctx in ("store", "param")}
    clobbered = sorted(stored & ROOTS)
    if clobbered:
        raise ExpressionError(f"{clobbered[0]!r} is a context name and cannot be assigned")
    roots = {n.name for n in tree.find_all(nodes.Name) if n.ctx == "load" and n.name not in stored}
    refs: set[str] = set()
    direct = 0
    for attr in tree.find_all(nodes.Getattr):
        if isinstance(attr.node, nodes.Name) and attr.node.name == "nodes":
            refs.add(attr.attr)
            direct += 1
    for item in tree.find_all(nodes.Getitem):
        if isinstance(item.node, nodes.Name) and item.node.name == "nodes":
            if not (isinstance(item.arg, nodes.Const) and isinstance(item.arg.value, str)):
                raise ExpressionError(
                    "read other nodes as nodes.<id> or nodes['<id>'], with a fixed id"
                )
            refs.add(item.arg.value)
            direct += 1
    uses = sum(1 for n in tree.find_all(nodes.Name) if n.ctx == "load" and n.name == "nodes")
    if uses > direct:
        # `nodes` passed whole to a filter, a loop or a variable would hide which
        # nodes are read.
        raise ExpressionError(
            "read other nodes as nodes.<id> or nodes['<id>'], not `nodes` as a whole"
        )
    return Parsed(node_refs=frozenset(refs), roots=frozenset(roots))


def _check_roots(parsed: Parsed) -> None:
    unknown = sorted(parsed.roots - CONTEXT_ROOTS - set(environment.globals))
    if unknown:
        raise ExpressionError(
            f"unknown name {unknown[0]!r}; use one of {', '.join(sorted(CONTEXT_ROOTS - {'loop'}))}"
        )


def _guard(source: str) -> None:
    if len(source) > MAX_SOURCE_CHARS:
        raise ExpressionError(f"longer than {MAX_SOURCE_CHARS} characters")


def parse_template(source: str) -> Parsed:
    _guard(source)
    try:
        parsed = _analyse(environment.parse(source))
    except TemplateSyntaxError as exc:
        raise ExpressionError(
            f"template does not parse (line {exc.lineno}): {exc.message}"
        ) from exc
    except RecursionError as exc:
        raise ExpressionError("template nests too deeply") from exc
    _check_roots(parsed)
    return parsed


def parse_expression(source: str) -> Parsed:
    """A condition such as `nodes.fetch.output.status == 200`: one expression, parsed
    to its end (as Jinja's compile_expression does), nothing around it."""
    _guard(source)
    try:
        parser = Parser(environment, source, state="variable")
        expr = parser.parse_expression()
        if not parser.stream.eos:
            raise TemplateSyntaxError(
                "unexpected text after the expression", parser.stream.current.lineno
            )
        parsed = _analyse(nodes.Template([nodes.Output([expr])]))
    except TemplateSyntaxError as exc:
        raise ExpressionError(f"expression does not parse: {exc.message}") from exc
    except RecursionError as exc:
        raise ExpressionError("expression nests too deeply") from exc
    _check_roots(parsed)
    return parsed


MAX_RENDER_CHARS = 1_000_000


@lru_cache(maxsize=4096)
def _compiled(source: str) -> Template:
    # Compiling is most of a render's cost; a run renders the same sources again and
    # again (every run of a workflow, every item of a loop).
    return environment.from_string(source)


@lru_cache(maxsize=4096)
def _compiled_expression(source: str) -> Any:
    return environment.compile_expression(source, undefined_to_none=True)


def render(source: str, context: dict[str, Any], *, max_chars: int = MAX_RENDER_CHARS) -> str:
    """Render a template in the sandbox; output beyond `max_chars` is an error, not a
    truncation (a half JSON document is worse than none)."""
    out = _compiled(source).render(**context)
    if len(out) > max_chars:
        raise ExpressionError(f"rendered output is longer than {max_chars} characters")
    return out


def evaluate(expression: str, context: dict[str, Any]) -> Any:
    """The value of a condition or items expression, in the sandbox."""
    return _compiled_expression(expression)(**context)
