"""What a node handler gets and gives back."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.credentials.service import reveal, touch
from backend.kit.db import UnitOfWork
from backend.models import Credential
from backend.workflows.graph import Node
from backend.workflows.templates import TemplateLimit, evaluate, render
from workers.engine.retry import NodeFailure


@dataclass
class NodeResult:
    output: Any = None
    # if/switch choose the branch their outgoing connections carry.
    branch: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    # Variables a `set` node adds to the run's `vars`.
    variables: dict[str, Any] = field(default_factory=dict)
    # A node that must wait (approval, wait): the run parks, holding no worker slot,
    # until `wait_until` (None: until woken) or until something wakes it; the node runs
    # again then and says whether it is done. `output` shows what it waits for.
    waits: bool = False
    wait_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class SubRun:
    execution_id: uuid.UUID
    status: str
    output: Any = None
    error: dict[str, Any] | None = None


@dataclass
class NodeContext:
    node: Node
    config: Any
    execution_id: uuid.UUID
    workspace_id: uuid.UUID
    settings: Settings
    # trigger, nodes (id -> {"output": ...}), vars, execution: what templates see.
    scope: dict[str, Any]
    http: httpx.AsyncClient
    sessionmaker: async_sessionmaker[AsyncSession]
    # Set for a loop (for_each, while): runs the body for pass `index` with the loop's
    # names (item/index or iteration/last) added to the scope; returns its output.
    run_body: Callable[[int, dict[str, Any]], Awaitable[Any]] | None = None
    # Set for a sub_workflow node: starts (or finds) the child run for this node and
    # returns its execution row once it ended (or at once when not waiting).
    run_workflow: Callable[[uuid.UUID, dict[str, Any], bool], Awaitable[SubRun]] | None = None
    # Tokens and cost spent by child runs this node waited for, added to its own.
    usage: list[float] = field(default_factory=lambda: [0, 0, 0.0])
    # This node's attempt (1 for the first run of it).
    attempt: int = 1
    # Sends an event about this node to the run's followers (type, data).
    emit: Callable[[str, dict[str, Any]], None] | None = None
    # When this node's time is up (time.monotonic()); renders stop there too, since they
    # run in the event loop where nothing else can interrupt them.
    deadline: float | None = None
    # The node's id in the run (`<loop>.<node>` for a loop body node) and its pass
    # through the loop, set by the engine; None for a node outside any loop.
    key: str | None = None
    iteration: int | None = None
    # For a step that waits (approval, wait): when it began waiting, if it already
    # parked the run before (None: this is its first look).
    waiting_since: datetime | None = None

    @property
    def idempotency_key(self) -> str:
        """The same for every attempt of this node execution, including a run resumed
        after a crash, and different for every pass of a loop: a target that dedupes on
        it sees each execution once although we deliver at least once."""
        iteration = self.iteration
        if iteration is None:
            # Until the engine says, the pass is what the body's scope holds.
            iteration = self.scope.get("index", self.scope.get("iteration", 0))
        return f"{self.execution_id}:{self.key or self.node.id}:{iteration}"

    async def secret(self, credential_id: uuid.UUID) -> dict[str, Any]:
        """A credential's secret, from this workspace only; marks the credential used.
        Never put it in an output or a log."""
        async with UnitOfWork(self.sessionmaker) as uow:
            credential = await uow.session.get(Credential, credential_id)
            if credential is None or credential.workspace_id != self.workspace_id:
                raise NodeFailure("credential not found in this workspace", "permanent")
            secret = reveal(self.settings, credential)
            touch(credential)
        return secret

    def log(self, message: str, **data: Any) -> None:
        """A line for the run's followers (a `node.log` event); never secrets."""
        if self.emit is not None:
            self.emit("node.log", {"message": message, **data})

    def render(self, source: str) -> str:
        try:
            return render(source, self.scope, deadline=self.deadline)
        except TemplateLimit as exc:
            raise NodeFailure(f"template stopped: {exc}", "permanent") from exc
        except Exception as exc:
            raise NodeFailure(f"template failed: {type(exc).__name__}: {exc}", "permanent") from exc

    def evaluate(self, expression: str) -> Any:
        try:
            return evaluate(expression, self.scope, deadline=self.deadline)
        except TemplateLimit as exc:
            raise NodeFailure(f"expression stopped: {exc}", "permanent") from exc
        except Exception as exc:
            raise NodeFailure(
                f"expression failed: {type(exc).__name__}: {exc}", "permanent"
            ) from exc

    def render_json(self, source: str) -> Any:
        """A template meant to produce JSON; plain text stays text."""
        text = self.render(source)
        try:
            return json.loads(text)
        except ValueError:
            return text

    def render_tree(self, value: Any) -> Any:
        """Every string in a JSON value rendered as a JSON template (render_json)."""
        if isinstance(value, str):
            return self.render_json(value)
        if isinstance(value, dict):
            return {k: self.render_tree(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.render_tree(v) for v in value]
        return value


IDEMPOTENCY_HEADER = "Idempotency-Key"


def outbound_request(
    ctx: NodeContext, headers: dict[str, str], query: dict[str, str], body: Any
) -> tuple[dict[str, str], dict[str, str], bytes | None]:
    """An outbound call's rendered headers, query and body (a string body is one JSON
    template, an object or list has templates in its strings), with a JSON content type
    and the node execution's Idempotency-Key unless the node set its own: retries and a
    run resumed after a crash send the same key, so a target that dedupes on it acts
    once although the engine delivers at least once."""
    rendered_headers = {k: ctx.render(v) for k, v in headers.items()}
    params = {k: ctx.render(v) for k, v in query.items()}
    content: bytes | None = None
    if isinstance(body, str):
        rendered = ctx.render_json(body)
        content = (json.dumps(rendered) if not isinstance(rendered, str) else rendered).encode()
    elif body is not None:
        content = json.dumps(ctx.render_tree(body)).encode()
    names = {k.lower() for k in rendered_headers}
    if content is not None and "content-type" not in names:
        rendered_headers["Content-Type"] = "application/json"
    if IDEMPOTENCY_HEADER.lower() not in names:
        rendered_headers[IDEMPOTENCY_HEADER] = ctx.idempotency_key
    return rendered_headers, params, content


Handler = Callable[[NodeContext], Awaitable[NodeResult]]
