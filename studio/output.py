"""How the CLI answers: tables for people, JSON for scripts (`--json`), and one exit
code per kind of outcome so scripts can branch without parsing text."""

from __future__ import annotations

import json
import sys
from enum import IntEnum
from typing import Any

from rich.console import Console
from rich.table import Table


class Exit(IntEnum):
    OK = 0
    # A run that ended `failed` (run --wait/--follow, executions show --wait).
    RUN_FAILED = 1
    # Bad arguments or input the server refused as invalid (422), or an invalid file.
    USAGE = 2
    RUN_CANCELLED = 3
    # Not signed in, credential refused (401) or not allowed (403).
    AUTH = 4
    NOT_FOUND = 5
    # The server refused because of the resource's state (409): e.g. an archived
    # workflow, a run that already ended.
    CONFLICT = 6
    # The server could not be reached, or answered 5xx / 503 / 429.
    UNAVAILABLE = 7
    # --timeout passed while the run was still going (it goes on).
    TIMEOUT = 8


RUN_EXIT = {"completed": Exit.OK, "failed": Exit.RUN_FAILED, "cancelled": Exit.RUN_CANCELLED}

# Piped output is read by scripts and people's tools: wide enough that ids never fold
# (rich assumes 80 columns when it cannot ask a terminal).
out = Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 240)
err = Console(stderr=True, highlight=False)


class Failure(Exception):
    """Ends the command with `code`, printing `body` (error, detail, ...) for people
    as a line on stderr, for scripts as JSON on stderr."""

    def __init__(self, code: Exit, body: dict[str, Any]) -> None:
        super().__init__(body.get("detail") or body.get("error"))
        self.code = code
        self.body = body


def fail(code: Exit, error: str, detail: str, **extra: Any) -> Failure:
    return Failure(code, {"error": error, "detail": detail, **extra})


def report(failure: Failure, *, as_json: bool) -> None:
    if as_json:
        sys.stderr.write(json.dumps(failure.body, default=str) + "\n")
        return
    body = failure.body
    line = f"[bold red]error[/]: {escape(str(body.get('detail') or body.get('error')))}"
    if body.get("field"):
        line += f" [dim](field: {escape(str(body['field']))})[/]"
    err.print(line)
    for problem in body.get("problems") or body.get("fields") or []:
        where = problem.get("field") or problem.get("node_id") or ""
        err.print(f"  - {escape(str(where))}: {escape(str(problem.get('message')))}")
    if body.get("hint"):
        err.print(f"[dim]{escape(str(body['hint']))}[/]")


def escape(text: str) -> str:
    """Text from the server or a file, shown literally (never as rich markup)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, default=str, indent=2) + "\n")
    sys.stdout.flush()


def emit_line(value: Any) -> None:
    """One JSON document per line (streams: `run --follow --json`)."""
    sys.stdout.write(json.dumps(value, default=str, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def table(columns: list[str], rows: list[list[Any]], *, title: str | None = None) -> None:
    grid = Table(title=title, show_edge=False, header_style="bold")
    for column in columns:
        grid.add_column(column, overflow="fold")
    for row in rows:
        grid.add_row(*(escape("" if v is None else str(v)) for v in row))
    out.print(grid)


def short_time(value: str | None) -> str:
    """'2026-11-01T12:34:56.789+00:00' -> '2026-11-01 12:34:56'."""
    if not value:
        return ""
    return value.replace("T", " ")[:19]


def duration(ms: float | None) -> str:
    if ms is None:
        return ""
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    return f"{int(ms // 60_000)} min {ms % 60_000 / 1000:.0f} s"


def tokens(input_tokens: int | None, output_tokens: int | None) -> str:
    if not input_tokens and not output_tokens:
        return ""
    return f"{input_tokens or 0} in / {output_tokens or 0} out"


def cost(value: float | None) -> str:
    return f"${value:.4f}" if value else ""
