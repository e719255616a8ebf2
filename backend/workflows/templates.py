"""Templates and conditions: Jinja2's sandboxed environment, parsed here and rendered
by the engine, never `eval`. Parsing also tells which nodes an expression reads, so the
validator can insist they run before it.

Context names an expression may use: `trigger`, `nodes`, `vars`, `execution`, and inside
a for_each body `item` and `index` (`loop` inside a `{% for %}`). Secrets are never in
the context. `nodes` may only be read as `nodes.<id>` or `nodes['<id>']`, so every read
of another node's output is visible to the validator.

Every render and evaluation is bounded by resource, not by syntax (a limit on one
operator is bypassed by the next one):
- time: RENDER_SECONDS, or the caller's deadline when sooner. Generated code calls
  `environment.tick()` at the top of every block body (template, loop pass, if branch),
  and so do every filter, test and call; the output is consumed chunk by chunk.
- size: no operation builds a value printing to more than MAX_VALUE_CHARS characters or
  an integer of more than MAX_INT_BITS bits. Operators, literals, `~`, output, filters,
  methods and str.format/`%` widths are checked before the value is built, counting
  shared parts every time they appear (`[x, x]` nested forty times is 2**40 x).
Either stops the render with TemplateLimit, whose message names the limit.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import (
    Callable,
    ItemsView,
    Iterable,
    Iterator,
    KeysView,
    Mapping,
    ValuesView,
)
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from itertools import repeat
from types import BuiltinMethodType, MethodType
from typing import Any

from jinja2 import Template, TemplateSyntaxError, nodes
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.exceptions import SecurityError
from jinja2.parser import Parser
from jinja2.sandbox import (
    ImmutableSandboxedEnvironment,
    SandboxedEscapeFormatter,
    SandboxedFormatter,
)
from jinja2.utils import Namespace, _PassArg
from markupsafe import Markup

ROOTS = frozenset({"trigger", "nodes", "vars", "execution"})
LOOP_ROOTS = frozenset({"item", "index", "iteration", "last"})
CONTEXT_ROOTS = ROOTS | LOOP_ROOTS | {"loop"}
MAX_SOURCE_CHARS = 20_000
# One cap for everything a template builds: a string, a list or dict (measured as it
# prints, shared parts counted every time), the rendered output. The same as a node's
# largest output (engine.max_output_bytes), so nothing a node may hold is refused.
MAX_VALUE_CHARS = 1_000_000
MAX_RENDER_CHARS = MAX_VALUE_CHARS
# Integers: 4096 bits (1234 decimal digits) is beyond any id, amount or hash a workflow
# handles, every such number still prints (Python refuses more than 4300 digits), and
# arithmetic on it costs microseconds, so only time can add up, and time is bounded.
MAX_INT_BITS = 4096
# A render's own time budget; the node's deadline applies when it is sooner. Rendering
# runs in the worker's event loop, so this is also how late a cancel or timeout can land.
RENDER_SECONDS = 1.0
FORBIDDEN_TAGS = (
    nodes.Include,
    nodes.Import,
    nodes.FromImport,
    nodes.Extends,
    nodes.Macro,
    nodes.CallBlock,
)


class ExpressionError(ValueError):
    pass


class TemplateLimit(ExpressionError, SecurityError):
    """A render stopped at one of its bounds (time, size); the message names it."""


# Time -------------------------------------------------------------------------------------


# (deadline, seconds): the monotonic time a render must end by, and its own budget in
# seconds, or None when the deadline is the caller's (the node's timeout).
_budget: ContextVar[tuple[float, float | None] | None] = ContextVar("template_budget", default=None)


def _budget_for(deadline: float | None, seconds: float) -> tuple[float, float | None]:
    own = time.monotonic() + seconds
    if deadline is not None and deadline < own:
        return (deadline, None)
    return (own, seconds)


def tick() -> None:
    """Stop the render once its budget is spent; cheap enough for every loop pass."""
    budget = _budget.get()
    if budget is not None and time.monotonic() > budget[0]:
        if budget[1] is None:
            raise TemplateLimit("template ran past its node's time limit (timeout_s)")
        raise TemplateLimit(f"template ran longer than {budget[1]:g} s (the limit of one render)")


def _ticking(items: Iterable[Any]) -> Iterator[Any]:
    for item in items:
        tick()
        yield item


# Size -------------------------------------------------------------------------------------


def _need(chars: int) -> None:
    if chars > MAX_VALUE_CHARS:
        raise TemplateLimit(
            f"template would build a value of more than {MAX_VALUE_CHARS} characters "
            "(the limit of one value)"
        )


def _need_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise TemplateLimit(
            f"template would build a number of more than {MAX_INT_BITS} bits "
            "(the limit of one number)"
        )


_STRS = frozenset({str})
_INTS = frozenset({int, bool})
# What walks like a list (dict views print their members too).
_MEMBERS = (list, tuple, set, frozenset, KeysView, ValuesView, ItemsView)
_BUILT = (dict, *_MEMBERS)


class _Weighed(list[Any]):
    """A list built by `+` that knows its weight, so `ns.l = ns.l + [row]` in a loop
    costs a copy per pass, not a walk of everything gathered so far. Lists cannot change
    in the sandbox; a namespace inside may, which is why printing walks it afresh."""

    __slots__ = ("_weight",)
    _weight: int


def _weight_of(value: Any) -> int:
    return value._weight if type(value) is _Weighed else _weigh(value)


def _weigh(value: Any, *, text: bool = False, indent: int = 0, limit: int = MAX_VALUE_CHARS) -> int:
    """About how many characters `value` prints as (str, repr or JSON), counting a part
    shared N times N times; raises TemplateLimit as soon as that passes `limit`, so a
    huge value costs no more than `limit` steps. `text` also looks into namespaces,
    whose contents may have changed since a value holding them was checked. `indent`
    adds per-member indentation (JSON or pprint with an indent)."""
    total = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    pop, push, extend = stack.pop, stack.append, stack.extend
    steps = 0
    while stack:
        steps += 1
        if not steps & 0xFFF:
            tick()  # a walk near the cap takes a good fraction of a second
        item, depth = pop()
        kind = type(item)
        members: Any = None
        if kind is str:
            total += len(item) + 2
        elif kind is int:
            total += item.bit_length() // 3 + 2
        elif kind is list or kind is tuple:
            members = item
        elif kind is _Weighed:
            if text:
                members = item
            else:
                total += item._weight
        elif kind is dict:
            keys = tuple(item)
            if set(map(type, keys)) <= _STRS:
                total += sum(map(len, keys))
            else:
                push((keys, depth))
            members = tuple(item.values())
        elif item is None or kind is float or kind is bool:
            total += 24
        elif isinstance(item, str | bytes):
            total += len(item) + 2
        elif isinstance(item, Namespace):
            total += 13
            if text:
                push((item._Namespace__attrs, depth))
        elif isinstance(item, Mapping):
            push((tuple(item), depth))
            members = tuple(item.values())
        elif isinstance(item, _MEMBERS):
            members = item
        else:
            total += 16
        if members is not None:
            count = len(members)
            total += 2 + 2 * count + count * (depth + 1) * indent
            if count < 8:
                extend(zip(members, repeat(depth + 1)))
            else:
                kinds = set(map(type, members))
                if kinds <= _STRS:
                    total += sum(map(len, members)) + 2 * count
                elif kinds <= _INTS:
                    total += sum(map(int.bit_length, members)) // 3 + 2 * count
                else:
                    extend(zip(members, repeat(depth + 1)))
        if total > limit:
            _need(total)
    return total


def _bounded(value: Any) -> Any:
    """A value some operation just built, checked before the template can use it."""
    if isinstance(value, str | bytes):
        _need(len(value))
    elif isinstance(value, int):
        _need_bits(value.bit_length())
    elif isinstance(value, _BUILT):
        _weigh(value)
    return value


def _text(value: Any) -> str:
    """str(value), refused before it is built when it would be too long; also what
    every `{{ }}` prints with (a list or namespace holding shared parts can print to
    far more than it occupies)."""
    if type(value) is str:
        return value
    _weigh(value, text=True)
    return str(value)


def _finalize(value: Any) -> Any:
    # Output inside `{% autoescape %}`, which the compiler does not route to text().
    if type(value) is not str:
        _weigh(value, text=True)
    return value


def _concat(parts: Iterable[str]) -> str:
    # environment.concat: joins a buffered block ({% set %}...{% endset %}, a filter
    # block, a recursive loop) and Template.render's output.
    if type(parts) is list:
        _need(sum(map(len, parts)))
        return "".join(parts)
    kept: list[str] = []
    size = 0
    for part in parts:
        size += len(part)
        _need(size)
        kept.append(part)
    return "".join(kept)


def _join_text(items: tuple[Any, ...]) -> str:
    # The `~` operator.
    parts = [item if type(item) is str else _text(item) for item in items]
    _need(sum(map(len, parts)))
    return "".join(parts)


def _built(value: Any) -> Any:
    # A list, tuple or dict literal: `[x, x]` doubles what x prints as.
    _weigh(value)
    return value


# printf-style `%`: a width or precision, given in the format or by `*`, pads the piece.
_PRINTF = re.compile(r"%(?:\(([^)]*)\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.)", re.S)
_SPEC_NUMBER = re.compile(r"\d+")


def _number(digits: str) -> int:
    # Seven digits are already past the cap; longer runs need no parsing.
    return int(digits) if len(digits) < 8 else MAX_VALUE_CHARS + 1


def _printf(fmt: str, values: Any) -> None:
    positional = values if isinstance(values, tuple) else (values,)
    mapping = values if isinstance(values, Mapping) else None
    index = 0
    size = len(fmt)
    for match in _PRINTF.finditer(fmt):
        key, width, precision, conversion = match.groups()
        if conversion == "%":
            continue
        for spec in (width, precision):
            if spec == "*":
                number = positional[index] if index < len(positional) else 0
                index += 1
                size += abs(number) if isinstance(number, int) else 0
            elif spec:
                size += _number(spec)
        if key is not None:
            value = mapping.get(key) if mapping is not None else None
        else:
            value = positional[index] if index < len(positional) else None
            index += 1
        # %f of a large float prints every digit of it (1e308 is 309 of them).
        size += _weigh(value, text=True) + (310 if conversion in "fF" else 0)
        _need(size)


class _BoundedFormatter(SandboxedFormatter):
    """str.format / format_map: each field's widths and value are checked before the
    field is formatted, and so is the running total (`{0}` may repeat)."""

    size = 0

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion is not None:
            _weigh(value, text=True)
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        numbers = map(_number, _SPEC_NUMBER.findall(format_spec))
        self.size += max(numbers, default=0) + _weigh(value, text=True)
        _need(self.size)
        return super().format_field(value, format_spec)


class _BoundedEscapeFormatter(_BoundedFormatter, SandboxedEscapeFormatter):
    pass


def _arg(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], index: int, name: str, default: Any
) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _replace(text: Any, old: Any, new: Any, count: Any) -> None:
    if not isinstance(text, str | bytes):
        return
    try:
        found = len(text) + 1 if not old else text.count(old)
    except TypeError:
        return  # str and bytes mixed: the call itself will say so
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    if isinstance(new, str | bytes):
        _need(len(text) + found * max(len(new) - len(old or ""), 0))


def _check_method(
    owner: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, ...]:
    """Methods of str and bytes that build long values from short arguments, checked
    before they run; returns the arguments to call with."""
    if name in ("ljust", "rjust", "center", "zfill"):
        width = _arg(args, kwargs, 0, "width", 0)
        if isinstance(width, int):
            _need(width)
    elif name == "expandtabs":
        size = _arg(args, kwargs, 0, "tabsize", 8)
        if isinstance(size, int):
            tab = "\t" if isinstance(owner, str) else b"\t"
            _need(len(owner) + owner.count(tab) * size)
    elif name == "replace":
        count = _arg(args, kwargs, 2, "count", -1)
        _replace(owner, _arg(args, kwargs, 0, "old", ""), _arg(args, kwargs, 1, "new", ""), count)
    elif name == "join" and args:
        items = list(_ticking(args[0]))
        pieces = sum(len(item) for item in items if isinstance(item, str | bytes))
        _need(pieces + len(owner) * max(len(items) - 1, 0))
        return (items, *args[1:])
    elif name == "translate" and isinstance(owner, str):
        table = _arg(args, kwargs, 0, "table", None)
        if isinstance(table, Mapping):
            longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1)
            _need(len(owner) * max(longest, 1))
    return args


# Filters ----------------------------------------------------------------------------------

# Filters that take a collection as it is (they neither print it nor call str() on it);
# every other filter prints its value, which is checked first.
_COLLECTION_FILTERS = frozenset(
    {
        "attr", "batch", "count", "d", "default", "dictsort", "first", "groupby", "items",
        "join", "last", "length", "list", "map", "max", "min", "pprint", "random", "reject",
        "rejectattr", "reverse", "select", "selectattr", "slice", "sort", "sum", "tojson",
        "unique",
    }
)  # fmt: skip

FilterCheck = Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]


def _check_center(value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    width = _arg(rest, kwargs, 0, "width", 80)
    if isinstance(width, int):
        _need(width)
    return value


def _check_indent(value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    width = _arg(rest, kwargs, 0, "width", 4)
    each = width if isinstance(width, int) else len(width) if isinstance(width, str) else 0
    if isinstance(value, str):
        _need(len(value) + (value.count("\n") + 1) * each)
    return value


def _check_wordwrap(value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    width = _arg(rest, kwargs, 0, "width", 79)
    wrap = _arg(rest, kwargs, 2, "wrapstring", None)
    if isinstance(value, str) and isinstance(width, int):
        breaks = len(value) // max(width, 1) + sum(map(value.count, " -\t\n")) + 1
        _need(len(value) + breaks * (len(wrap) if isinstance(wrap, str) else 2))
    return value


def _check_format(value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if isinstance(value, str):
        _printf(value, kwargs or rest)
    return value


def _check_replace(value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    old, new = _arg(rest, kwargs, 0, "old", ""), _arg(rest, kwargs, 1, "new", "")
    count = _arg(rest, kwargs, 2, "count", None)
    _replace(value, _text(old), _text(new), -1 if count is None else count)
    return value


def _check_join(value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    items = list(_ticking(value))
    glue = _arg(rest, kwargs, 0, "d", "")
    _need(_weigh(items, text=True) + len(_text(glue)) * max(len(items) - 1, 0))
    return items


def _check_fill(name: str) -> FilterCheck:
    def check(value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        count = _arg(rest, kwargs, 0, name, 1)
        fill = _arg(rest, kwargs, 1, "fill_with", None)
        if isinstance(count, int):
            _need(count)
            if fill is not None:
                _need(count * _weigh(fill))
        return value

    return check


def _check_sum(value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # sum() of lists copies the total so far at every item: quadratic, in one C call.
    return _ticking(value)


def _check_json(value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    indent = _arg(rest, kwargs, 0, "indent", None)
    step = indent if isinstance(indent, int) else len(indent) if isinstance(indent, str) else 0
    # Non-ASCII text is escaped (up to six characters each): checked after, as a bounded
    # factor of a bounded input.
    _weigh(value, text=True, indent=max(step, 0))
    return value


def _check_urlize(value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # Each link repeats its address and adds the rel and target attributes.
    if isinstance(value, str):
        attributes = sum(
            len(_text(_arg(rest, kwargs, i, k, None) or "")) for i, k in ((2, "target"), (3, "rel"))
        )
        links = value.count("://") + value.count("www.") + value.count("@")
        _need(2 * len(value) + links * (attributes + 48))
    return value


def _check_pprint(value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    _weigh(value, text=True, indent=1)
    return value


_FILTER_CHECKS: dict[str, FilterCheck] = {
    "center": _check_center,
    "indent": _check_indent,
    "wordwrap": _check_wordwrap,
    "format": _check_format,
    "replace": _check_replace,
    "join": _check_join,
    "batch": _check_fill("linecount"),
    "slice": _check_fill("slices"),
    "sum": _check_sum,
    "tojson": _check_json,
    "pprint": _check_pprint,
    "urlize": _check_urlize,
}


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    check = _FILTER_CHECKS.get(name)
    prints = name not in _COLLECTION_FILTERS
    skip = 0 if _PassArg.from_obj(func) is None else 1

    # wraps() keeps jinja_pass_arg, so the compiler still passes the context first.
    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        tick()
        value = args[skip]
        if prints and not isinstance(value, str | int | float) and value is not None:
            _weigh(value, text=True)
        if check is not None:
            checked = check(value, args[skip + 1 :], kwargs)
            if checked is not value:
                args = (*args[:skip], checked, *args[skip + 1 :])
        result = func(*args, **kwargs)
        return result if result is value else _bounded(result)

    return guarded


def _guard_test(func: Any) -> Callable[..., Any]:
    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        tick()
        return func(*args, **kwargs)

    return guarded


def _bounded_lipsum(lipsum: Any) -> Callable[..., Any]:
    # lipsum(n, html, min, max) builds n paragraphs of up to max words from two numbers.
    @functools.wraps(lipsum)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        count = _arg(args, kwargs, 0, "n", 5)
        words = (_arg(args, kwargs, 2, "min", 20), _arg(args, kwargs, 3, "max", 100))
        if isinstance(count, int) and all(isinstance(w, int) for w in words):
            # A word, its punctuation and space, and a share of <p></p>: at most 16.
            _need(count * max(words) * 16)
        return lipsum(*args, **kwargs)

    return bounded


# The environment ------------------------------------------------------------------------


class BoundedCodeGenerator(CodeGenerator):
    """Jinja's compiler with the bounds woven in: a tick at the top of every block body
    (so every loop pass, every branch taken and every recursive `loop()` call), and
    literals and `~` checked for size."""

    def blockvisit(self, nodes: Iterable[nodes.Node], frame: Frame) -> None:
        self.writeline("environment.tick()")
        super().blockvisit(nodes, frame)

    def visit_List(self, node: nodes.List, frame: Frame) -> None:  # noqa: N802
        self.write("environment.built(")
        super().visit_List(node, frame)
        self.write(")")

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:  # noqa: N802
        self.write("environment.built(")
        super().visit_Dict(node, frame)
        self.write(")")

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:  # noqa: N802
        if node.ctx != "load":  # an assignment target: `for k, v in ...`
            super().visit_Tuple(node, frame)
            return
        self.write("environment.built(")
        super().visit_Tuple(node, frame)
        self.write(")")

    def _output_child_pre(self, node: nodes.Expr, frame: Frame, finalize: Any) -> None:
        if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
            super()._output_child_pre(node, frame, finalize)
        else:
            self.write("environment.text(")

    def _output_child_post(self, node: nodes.Expr, frame: Frame, finalize: Any) -> None:
        if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
            super()._output_child_post(node, frame, finalize)
        else:
            self.write(")")

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:  # noqa: N802
        self.write("environment.join_text((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox (a template cannot even call list.append on its data),
    bounded in time and size: see the module's docstring."""

    code_generator_class = BoundedCodeGenerator
    intercepted_binops = frozenset({"+", "-", "*", "**", "%"})
    concat = staticmethod(_concat)
    tick = staticmethod(tick)
    built = staticmethod(_built)
    join_text = staticmethod(_join_text)
    text = staticmethod(_text)

    def __init__(self, **options: Any) -> None:
        super().__init__(finalize=_finalize, **options)
        self.globals["lipsum"] = _bounded_lipsum(self.globals["lipsum"])
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}
        self.tests = {name: _guard_test(f) for name, f in self.tests.items()}

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "+":
            if isinstance(left, str | bytes) and isinstance(right, str | bytes):
                _need(len(left) + len(right))
            elif isinstance(left, int) and isinstance(right, int):
                _need_bits(max(left.bit_length(), right.bit_length()) + 1)
            elif isinstance(left, list) and isinstance(right, list):
                weight = _weight_of(left) + _weight_of(right)
                _need(weight)
                gathered = _Weighed(left)
                gathered += right
                gathered._weight = weight
                return gathered
            elif isinstance(left, tuple) and isinstance(right, tuple):
                _weigh(left, limit=MAX_VALUE_CHARS - _weigh(right))
            return left + right
        if operator == "-":
            if isinstance(left, int) and isinstance(right, int):
                _need_bits(max(left.bit_length(), right.bit_length()) + 1)
            return left - right
        if operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                _need_bits(left.bit_length() + right.bit_length())
            else:
                for seq, times in ((left, right), (right, left)):
                    if isinstance(times, int) and times > 0 and _len_of(seq):
                        each = len(seq) if isinstance(seq, str | bytes) else _weigh(seq)
                        _need(each * times)
            return left * right
        if operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                if right > MAX_INT_BITS:
                    _need_bits(right)
                _need_bits(math.ceil(right * math.log2(abs(left))))
            return left**right
        if operator == "%" and isinstance(left, str | bytes):
            _printf(left if isinstance(left, str) else left.decode("latin-1"), right)
            return _bounded(left % right)
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        if not isinstance(value, MethodType | BuiltinMethodType) or value.__name__ not in (
            "format",
            "format_map",
        ):
            return None
        owner: Any = value.__self__
        if not isinstance(owner, str):
            return None
        is_format_map = value.__name__ == "format_map"
        kind: type[str] = type(owner)

        def wrapper(*args: Any, **kwargs: Any) -> str:
            tick()
            formatter: _BoundedFormatter
            if isinstance(owner, Markup):
                formatter = _BoundedEscapeFormatter(self, escape=owner.escape)
            else:
                formatter = _BoundedFormatter(self)
            if is_format_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                kwargs, args = args[0], ()
            return kind(_bounded(formatter.vformat(owner, args, kwargs)))

        return functools.update_wrapper(wrapper, value)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        tick()
        if isinstance(obj, BuiltinMethodType | MethodType):
            owner, name = obj.__self__, obj.__name__
            if isinstance(owner, str | bytes):
                args = _check_method(owner, name, args, kwargs)
            elif isinstance(owner, int) and name == "to_bytes":
                length = _arg(args, kwargs, 0, "length", 1)
                if isinstance(length, int):
                    _need(length)
            elif name in _READERS:
                # A part or a view of a value that exists already: nothing new is built
                # (and a node's large output is not measured at every read).
                return super().call(context, obj, *args, **kwargs)
        return _bounded(super().call(context, obj, *args, **kwargs))


# Methods that hand back (a view of) what their object already holds.
_READERS = frozenset({"get", "items", "keys", "values", "copy", "index", "count"})


def _len_of(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes | list | tuple) else 0


environment = BoundedSandbox(autoescape=False)


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


@lru_cache(maxsize=4096)
def _compiled(source: str) -> Template:
    # Compiling is most of a render's cost; a run renders the same sources again and
    # again (every run of a workflow, every item of a loop).
    return environment.from_string(source)


@lru_cache(maxsize=4096)
def _compiled_expression(source: str) -> Any:
    return environment.compile_expression(source, undefined_to_none=True)


def render(
    source: str,
    context: dict[str, Any],
    *,
    max_chars: int = MAX_RENDER_CHARS,
    deadline: float | None = None,
    seconds: float = RENDER_SECONDS,
) -> str:
    """Render a template in the sandbox, within `seconds` and before `deadline` (a
    time.monotonic() value); output beyond `max_chars` is an error, not a truncation (a
    half JSON document is worse than none)."""
    template = _compiled(source)
    token = _budget.set(_budget_for(deadline, seconds))
    try:
        chunks: list[str] = []
        size = 0
        # Chunk by chunk rather than Template.render, which joins everything first.
        for chunk in template.root_render_func(template.new_context(context)):
            size += len(chunk)
            if size > max_chars:
                raise TemplateLimit(f"rendered output is longer than {max_chars} characters")
            chunks.append(chunk)
        return "".join(chunks)
    finally:
        _budget.reset(token)


def evaluate(
    expression: str,
    context: dict[str, Any],
    *,
    deadline: float | None = None,
    seconds: float = RENDER_SECONDS,
) -> Any:
    """The value of a condition or items expression, in the sandbox, within the same
    bounds as render()."""
    compiled = _compiled_expression(expression)
    token = _budget.set(_budget_for(deadline, seconds))
    try:
        value = compiled(**context)
    finally:
        _budget.reset(token)
    return list(value) if type(value) is _Weighed else value
