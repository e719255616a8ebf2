"""Following a run as it happens, over the API's WebSocket
(`/api/v1/ws/executions/{id}`): every event of the run from its first, then live; on
a dropped or recycled connection the CLI reconnects and resumes from the last seq it
saw, so no event is shown twice or lost. Three views of the same stream: a live table for a
terminal, plain lines for a pipe or a log, NDJSON for scripts."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from rich.live import Live
from rich.table import Table
from rich.text import Text
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

from studio.api import API, Client
from studio.output import (
    Exit,
    cost,
    duration,
    emit_line,
    err,
    escape,
    fail,
    out,
    tokens,
)

TERMINAL = ("completed", "failed", "cancelled")
# Close codes after which resuming is the documented answer (lifetime reached, too
# slow, Redis away) or worth a try (abnormal closure, server restart).
RESUMABLE = {4000, 4408, 1013, 1001, 1006, 1011, 1012}
RECONNECT_DELAY_S = 0.5
MAX_RECONNECTS = 20
STATUS_STYLE = {
    "pending": "dim",
    "running": "yellow",
    "retrying": "magenta",
    "completed": "green",
    "failed": "bold red",
    "skipped": "dim",
    "cancelled": "red",
}


class View(Protocol):
    def message(self, body: dict[str, Any]) -> None: ...

    def finish(self) -> None: ...


@dataclass
class NodeState:
    status: str = "pending"
    attempt: int = 0
    duration_ms: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    error: str | None = None
    text: str = ""


@dataclass
class RunState:
    """What a view knows of the run, built from the snapshot and the events."""

    execution_id: str
    status: str = "pending"
    nodes: dict[str, NodeState] = field(default_factory=dict)
    end: dict[str, Any] = field(default_factory=dict)

    def node(self, node_id: str) -> NodeState:
        return self.nodes.setdefault(node_id, NodeState())

    def apply(self, body: dict[str, Any]) -> list[tuple[str, str]]:
        """Take one message in; answers the agent text it completed, as (node, line)."""
        kind = body.get("type")
        lines: list[tuple[str, str]] = []
        if kind == "snapshot":
            execution = body.get("execution") or {}
            self.status = execution.get("status", self.status)
            if self.status in TERMINAL:
                self.end = execution
            for row in body.get("nodes") or []:
                node = self.node(row["node_id"])
                node.status = row.get("status", node.status)
                node.attempt = row.get("attempt") or node.attempt
                node.duration_ms = row.get("duration_ms")
                node.error = _error_text(row.get("error"))
        elif kind == "execution.status":
            self.status = body.get("status", self.status)
            if self.status in TERMINAL:
                self.end = body.get("data") or {}
        elif kind == "node.status" and body.get("node_id"):
            node = self.node(body["node_id"])
            data = body.get("data") or {}
            node.status = body.get("status", node.status)
            node.attempt = data.get("attempt", node.attempt)
            if data.get("duration_ms") is not None:
                node.duration_ms = data["duration_ms"]
            node.input_tokens = data.get("input_tokens", node.input_tokens)
            node.output_tokens = data.get("output_tokens", node.output_tokens)
            node.cost_usd = data.get("cost_usd", node.cost_usd)
            node.error = _error_text(data.get("error")) or node.error
            if node.status in TERMINAL and node.text:
                lines.append((body["node_id"], node.text))
                node.text = ""
        elif kind == "agent.delta" and body.get("node_id"):
            node = self.node(body["node_id"])
            node.text += str((body.get("data") or {}).get("text", ""))
            *done, node.text = node.text.split("\n")
            lines.extend((body["node_id"], line) for line in done)
        return lines

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL


def _error_text(error: Any) -> str | None:
    if not error:
        return None
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or error)
    return str(error)


def _status(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def summary(state: RunState) -> str:
    end = state.end
    parts = [f"run {state.execution_id} {state.status}"]
    if end.get("duration_ms") is not None:
        parts.append(f"in {duration(end['duration_ms'])}")
    used = tokens(end.get("input_tokens"), end.get("output_tokens"))
    if used:
        parts.append(f"({used}, {cost(end.get('cost_usd'))})")
    error = _error_text(end.get("error"))
    if error:
        parts.append(f"- {error}")
    return " ".join(parts)


class LiveView:
    """A table that redraws in place: one line per node, agent text above it."""

    def __init__(self, execution_id: str, node_order: list[str]) -> None:
        self.state = RunState(execution_id)
        for node_id in node_order:
            self.state.node(node_id)
        self.live = Live(self._render(), console=out, refresh_per_second=8, transient=False)
        self.live.start()

    def _render(self) -> Table:
        grid = Table(
            title=f"run {self.state.execution_id}: {self.state.status}",
            title_justify="left",
            show_edge=False,
            header_style="bold",
        )
        for column in ("node", "status", "duration", "tokens", "cost", ""):
            grid.add_column(column)
        for node_id, node in self.state.nodes.items():
            note = node.error or (node.text[-60:] if node.status == "running" else "")
            attempt = f" (attempt {node.attempt})" if node.attempt > 1 else ""
            grid.add_row(
                escape(node_id),
                _status(node.status + attempt),
                duration(node.duration_ms),
                tokens(node.input_tokens, node.output_tokens),
                cost(node.cost_usd),
                Text(note, style="dim"),
            )
        return grid

    def message(self, body: dict[str, Any]) -> None:
        for node_id, line in self.state.apply(body):
            self.live.console.print(f"[cyan]{escape(node_id)}[/] │ {escape(line)}")
        self.live.update(self._render())

    def finish(self) -> None:
        self.live.update(self._render())
        self.live.stop()
        if self.state.ended:
            out.print(summary(self.state))


class PlainView:
    """One line per change, for output that is not a terminal (pipes, CI logs)."""

    def __init__(self, execution_id: str) -> None:
        self.state = RunState(execution_id)

    def message(self, body: dict[str, Any]) -> None:
        state = self.state
        kind = body.get("type")
        before = state.status
        lines = state.apply(body)
        for node_id, line in lines:
            out.print(f"{escape(node_id)} | {escape(line)}")
        if kind == "snapshot":
            out.print(f"run {state.execution_id} {state.status}")
            for node_id, node in state.nodes.items():
                out.print(
                    f"  {escape(node_id)} {node.status} {duration(node.duration_ms)}".rstrip()
                )
        elif kind == "execution.status" and state.status != before and not state.ended:
            out.print(f"run {state.execution_id} {state.status}")
        elif kind == "node.status" and body.get("node_id"):
            node = state.nodes[body["node_id"]]
            extra = " ".join(
                p
                for p in (
                    duration(node.duration_ms) if node.status != "running" else "",
                    tokens(node.input_tokens, node.output_tokens),
                    cost(node.cost_usd),
                    node.error or "",
                )
                if p
            )
            out.print(f"  {escape(body['node_id'])} {node.status} {escape(extra)}".rstrip())

    def finish(self) -> None:
        if self.state.ended:
            out.print(summary(self.state))


class JsonLinesView:
    """Every message as it came, one JSON document a line."""

    def __init__(self, execution_id: str) -> None:
        self.state = RunState(execution_id)

    def message(self, body: dict[str, Any]) -> None:
        self.state.apply(body)
        emit_line(body)

    def finish(self) -> None:
        pass


class QuietView:
    """Follows without showing anything (`--wait`)."""

    def __init__(self, execution_id: str) -> None:
        self.state = RunState(execution_id)

    def message(self, body: dict[str, Any]) -> None:
        self.state.apply(body)

    def finish(self) -> None:
        pass


def ws_url(http_url: str, execution_id: str) -> str:
    base = "ws" + http_url.removeprefix("http")
    return f"{base}{API}/ws/executions/{execution_id}"


def _open(client: Client, execution_id: str, resume_from: int) -> ClientConnection:
    credential = client.credential()
    assert credential is not None
    try:
        socket = connect(
            ws_url(client.ctx.url, execution_id),
            subprotocols=[Subprotocol("bearer"), Subprotocol(credential)],
            open_timeout=10,
            user_agent_header="studio-cli",
            max_size=16 * 2**20,
        )
    except InvalidStatus as exc:
        raise fail(
            Exit.UNAVAILABLE,
            "websocket_refused",
            f"the server refused the live stream (HTTP {exc.response.status_code})",
        ) from None
    socket.send(json.dumps({"resume_from": resume_from}))
    return socket


def follow(
    client: Client,
    execution_id: str,
    view: View,
    state: Callable[[], RunState],
    *,
    timeout_s: float | None = None,
) -> str | None:
    """Show the run's events until it ends; its final status, or None if `timeout_s`
    passed first. Reconnects and resumes on the close codes that ask for it."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    # From seq 0: the whole story (every node's transitions, the agent's text from its
    # first word) rather than a snapshot of where it stands; later, what we missed.
    last_seq = 0
    reconnects = 0
    refreshed = False
    try:
        while True:
            try:
                socket = _open(client, execution_id, last_seq)
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                reconnects += 1
                if reconnects > MAX_RECONNECTS:
                    raise fail(
                        Exit.UNAVAILABLE, "unreachable", f"live stream unavailable: {exc}"
                    ) from None
                time.sleep(RECONNECT_DELAY_S)
                continue
            with socket:
                try:
                    while True:
                        wait = None if deadline is None else deadline - time.monotonic()
                        if wait is not None and wait <= 0:
                            return None
                        raw = socket.recv(timeout=wait)
                        messages = json.loads(raw)
                        for body in messages if isinstance(messages, list) else [messages]:
                            if not isinstance(body, dict) or body.get("type") == "ping":
                                continue
                            if isinstance(body.get("seq"), int):
                                last_seq = body["seq"]
                            view.message(body)
                            if state().ended:
                                return state().status
                except TimeoutError:
                    return None
                except ConnectionClosed as closed:
                    code = closed.rcvd.code if closed.rcvd else 1006
                    reason = closed.rcvd.reason if closed.rcvd else ""
            if state().ended:
                return state().status
            if code == 4401 and not client.ctx.api_key and not refreshed:
                client.refresh()
                refreshed = True
                continue
            if code in (4401, 4403):
                raise fail(
                    Exit.AUTH, "permission_denied", reason or "not allowed to follow this run"
                )
            if code == 4404:
                raise fail(Exit.NOT_FOUND, "not_found", reason or "execution not found")
            if code in RESUMABLE or code == 1000:
                reconnects += 1
                if reconnects > MAX_RECONNECTS:
                    raise fail(Exit.UNAVAILABLE, "unreachable", f"live stream closed ({code})")
                time.sleep(RECONNECT_DELAY_S if code != 4000 else 0)
                continue
            raise fail(Exit.UNAVAILABLE, "stream_closed", f"live stream closed: {code} {reason}")
    finally:
        view.finish()


def choose_view(execution_id: str, *, as_json: bool, quiet: bool, node_order: list[str]) -> Any:
    if quiet:
        return QuietView(execution_id)
    if as_json:
        return JsonLinesView(execution_id)
    if out.is_terminal:
        return LiveView(execution_id, node_order)
    return PlainView(execution_id)


__all__ = ["LiveView", "PlainView", "choose_view", "err", "follow"]
