"""What the API accepts, decided once at the edge, for every route (typed bodies, the
raw-body webhooks, query strings, path and headers alike):

- JSON numbers are finite: `NaN`, `Infinity` and literals that overflow a float
  (`1e999`) are refused, and so are integers longer than Python will parse;
- no text carries a NUL character (PostgreSQL cannot store one);
- JSON nests at most MAX_JSON_DEPTH levels, checked without recursion, so neither the
  parser nor whatever serialises the value again later can run out of stack.

A refusal is an InputRejected naming the field; the request middleware answers it 422
`validation_error` with the same `fields` list as any other validation error. Syntax
errors are not refused here: the route answers them as it always did.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

MAX_JSON_DEPTH = 64
NUL = "\x00"


@dataclass(frozen=True, slots=True)
class Problem:
    field: str
    where: str  # body, query, path, header
    message: str
    type: str


class InputRejected(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(f"{problem.field}: {problem.message}")
        self.problem = problem


def _short(path: str) -> str:
    return path if len(path) <= 120 else path[:117] + "..."


def _join(path: str, part: str | int) -> str:
    if isinstance(part, int):
        return f"{path}[{part}]"
    return f"{path}.{part}" if path else part


def _check_tree(value: Any, root: str, where: str) -> None:
    # An explicit stack: the check must not itself recurse on a deep value.
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            if NUL in item:
                raise InputRejected(
                    Problem(path or root, where, "must not contain NUL characters", "string_nul")
                )
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise InputRejected(
                    Problem(path or root, where, "must be a finite number", "finite_number")
                )
        elif isinstance(item, dict | list):
            if depth >= MAX_JSON_DEPTH:
                raise InputRejected(
                    Problem(
                        _short(path) or root,
                        where,
                        f"nested deeper than {MAX_JSON_DEPTH} levels",
                        "json_too_deep",
                    )
                )
            if isinstance(item, dict):
                for key, child in item.items():
                    if NUL in key:
                        raise InputRejected(
                            Problem(path or root, where, "keys must not contain NUL", "string_nul")
                        )
                    stack.append((child, _join(path, key), depth + 1))
            else:
                stack.extend((child, _join(path, i), depth + 1) for i, child in enumerate(item))


def loads(raw: bytes | str, *, root: str = "body") -> Any:
    """Parse JSON the way the API accepts it. Raises InputRejected for values it never
    accepts and json.JSONDecodeError for text that is not JSON."""
    try:
        value = json.loads(raw, parse_constant=float)
    except RecursionError:
        raise InputRejected(
            Problem(root, "body", f"nested deeper than {MAX_JSON_DEPTH} levels", "json_too_deep")
        ) from None
    except json.JSONDecodeError:
        raise
    except ValueError:
        # Integers past sys.get_int_max_str_digits(), or bytes that are not UTF-8.
        raise InputRejected(
            Problem(root, "body", "holds a number too large or text that is not UTF-8", "value")
        ) from None
    _check_tree(value, root, "body")
    return value


def check_text(value: str, field: str, where: str) -> None:
    if NUL in value:
        raise InputRejected(Problem(field, where, "must not contain NUL characters", "string_nul"))


def check_query(query_string: bytes) -> None:
    # Decoded the way Starlette decodes it, so `%00` is seen as the NUL it becomes.
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        check_text(name, name.replace(NUL, "\\x00"), "query")
        check_text(value, name, "query")


def check_form(body: bytes) -> None:
    for name, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
        check_text(name, name.replace(NUL, "\\x00"), "body")
        check_text(value, name, "body")


def is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def is_form(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/x-www-form-urlencoded"


def check_body(content_type: str | None, body: bytes) -> None:
    """Refuse a body the API never accepts. FastAPI reads a body without a content type
    as JSON, so one that parses as JSON is held to the same rules."""
    if not body.strip():
        return
    if is_form(content_type):
        check_form(body)
        return
    if not (is_json(content_type) or not content_type):
        return
    try:
        loads(body)
    except json.JSONDecodeError:
        return


# What an outgoing HTTP header value may carry as httpx sends it (ASCII: visible
# characters, space, tab; no CR or LF). A secret that fails this would fail only when
# sent, in the HTTP client's error, with the value quoted.
_HEADER_VALUE = re.compile(r"^[\t\x20-\x7e]*$")


def is_header_value(text: str) -> bool:
    return _HEADER_VALUE.match(text) is not None
