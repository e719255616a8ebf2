"""Text to workflow: the model drafts a definition through a forced `submit_workflow`
tool call whose input schema is the node catalogue; deterministic repairs come first,
then `graph.validate()`, and the problems left go back to the model for up to
GENERATE__MAX_REPAIR_ROUNDS more answers. A draft is saved only when it validates (a
new workflow as a draft; an edit as a new version, with optimistic concurrency).

No database connection is held while the model thinks: the workspace context is read,
the transaction committed, and the save opens the next one.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from backend.activity.service import record
from backend.agents import runtime
from backend.auth.dependencies import WorkspaceAccess
from backend.config import Settings
from backend.generate import catalogue, repair
from backend.generate.model import SUBMIT_TOOL, Caller, Spend
from backend.generate.schemas import (
    Diff,
    EditRequest,
    EditResult,
    GenerateRequest,
    GenerateResult,
    NodeChange,
)
from backend.kit.db import UnitOfWork
from backend.kit.errors import DependencyUnavailable, QuotaExceeded, UpstreamError, ValidationFailed
from backend.kit.lazy import lazy_module
from backend.kit.ratelimit import RateLimiter
from backend.models import Agent, Credential, Workflow
from backend.workflows import service as workflows
from backend.workflows.graph import Context, GraphInvalid, Problem, validate
from backend.workflows.schemas import WorkflowCreate, WorkflowUpdate

if TYPE_CHECKING:
    import anthropic
else:
    # Imported on first use: see backend/kit/lazy.py.
    anthropic = lazy_module("anthropic")

Emit = Callable[[str, dict[str, Any]], Awaitable[None]]
# Agents and credentials named to the model when the request does not choose.
CONTEXT_LIMIT = 50

SYSTEM = """You design workflows for Orchestration Studio. A workflow is a directed \
acyclic graph of nodes built from five primitives: trigger, agent, action, logic, \
integration. Call the `submit_workflow` tool with the COMPLETE definition every time.

Rules the validator enforces:
- Node ids: letters, digits and underscores, starting with a letter or underscore, unique.
- At least one trigger node; triggers have no incoming connections.
- Connections go source -> target between existing nodes, and never form a cycle.
- `branch` is set only on connections leaving an `if` node ("true"/"false"), a `switch` \
node (one of its case labels, or "default") or a node with continue_on_error ("error").
- Templates are Jinja2: `{{ nodes.<id>.output.<field> }}`, `{{ trigger.<field> }}` (the \
data the run started with), `{{ vars.<name> }}` (set by `set` nodes). Conditions (if, \
switch `when`, while, for_each `items`) are bare expressions such as \
`nodes.fetch.output.status == 200`. A node may only read nodes that run before it: \
there must be a path of connections from the node it reads to the node reading it.
- A key named like a dict method (items, keys, values, get, update, pop, copy) must be \
read with a subscript: `trigger['items']`, `nodes.fetch.output.body['items']`. \
`trigger.items` is the dict's method, not the key, and the run fails.
- Inside a for_each body, `item` and `index` are available; inside a while, `iteration` \
and `last`.
- Outputs: trigger -> the trigger data; http_request -> {status, headers, body}; agent -> \
{text, stop_reason, ...}; if -> {result}; set -> the variables; transform -> the \
rendered value; file_read -> the file; for_each -> the list of body results.
- Refer to agents and credentials only by the ids listed below; never invent ids and \
never put secrets (keys, passwords, tokens) in a definition. An agent node without an \
agent id needs an inline `model`.
- Prefer few nodes. Give transient-failure-prone nodes (HTTP, agents) a retry policy \
when asked for reliability.
{constraints}
Node types and kinds available:
{kinds}

Agents in this workspace (id: name - description):
{agents}

Credentials in this workspace (id: name (type)):
{credentials}
"""


@dataclass
class Outcome:
    name: str = ""
    description: str = ""
    notes: str = ""
    definition: dict[str, Any] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)
    rounds: int = 0
    stop_reason: str = "max_rounds"


async def _nothing(_: str, __: dict[str, Any]) -> None:
    return None


def check_types(types: list[str] | None) -> list[str] | None:
    if types is None:
        return None
    known = catalogue.node_types()
    unknown = [t for t in types if t not in known]
    if unknown:
        raise ValidationFailed(
            f"unknown node type {unknown[0]!r} (known: {', '.join(known)})",
            field="constraints.node_types",
        )
    # Every workflow needs a trigger, whatever the caller listed.
    return sorted(set(types) | {"trigger"})


async def context_lists(
    uow: UnitOfWork,
    access: WorkspaceAccess,
    agent_ids: list[uuid.UUID] | None,
    credential_ids: list[uuid.UUID] | None,
) -> tuple[list[Agent], list[Credential]]:
    session = uow.session
    ws = access.workspace.id
    agent_stmt = select(Agent).where(Agent.workspace_id == ws).order_by(Agent.name, Agent.id)
    cred_stmt = (
        select(Credential)
        .where(Credential.workspace_id == ws)
        .order_by(Credential.name, Credential.id)
    )
    if agent_ids is not None:
        agent_stmt = agent_stmt.where(Agent.id.in_(agent_ids))
    else:
        agent_stmt = agent_stmt.limit(CONTEXT_LIMIT)
    if credential_ids is not None:
        cred_stmt = cred_stmt.where(Credential.id.in_(credential_ids))
    else:
        cred_stmt = cred_stmt.limit(CONTEXT_LIMIT)
    agents = list((await session.scalars(agent_stmt)).all())
    creds = list((await session.scalars(cred_stmt)).all())
    # Someone else's id is "not found here", never a hint that it exists elsewhere.
    for wanted, found, name in (
        (agent_ids, {a.id for a in agents}, "agent_ids"),
        (credential_ids, {c.id for c in creds}, "credential_ids"),
    ):
        missing = [i for i in wanted or [] if i not in found]
        if missing:
            raise ValidationFailed(f"{missing[0]} is not in this workspace", field=name)
    return agents, creds


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(text.split())[:limit]


def _system(
    agents: list[Agent],
    creds: list[Credential],
    allowed: list[str] | None,
    max_nodes: int | None,
) -> str:
    rules = []
    if allowed is not None:
        rules.append(f"- Use only these node types: {', '.join(allowed)}.")
    if max_nodes is not None:
        rules.append(f"- Use at most {max_nodes} nodes.")
    kinds = "\n".join(
        f"- {n['type']}" + (f".{n['kind']}" if n["kind"] else "")
        + (f": {_one_line(n['description'])}" if n["description"] else "")
        for n in catalogue.catalogue(allowed)["nodes"]
    )  # fmt: skip
    parts = dict(
        constraints="\n".join(rules),
        kinds=kinds,
        agents="\n".join(
            f"- {a.id}: {_one_line(a.name, 100)} - {_one_line(a.description)}" for a in agents
        )
        or "(none)",
        credentials="\n".join(f"- {c.id}: {_one_line(c.name, 100)} ({c.type})" for c in creds)
        or "(none)",
    )
    # Not str.format: the text itself holds braces (Jinja, JSON).
    text = SYSTEM
    for key, value in parts.items():
        text = text.replace("{" + key + "}", value)
    return text


def _extra_problems(
    definition: dict[str, Any], allowed: list[str] | None, max_nodes: int | None
) -> list[Problem]:
    out: list[Problem] = []
    nodes = [n for n in definition.get("nodes", []) if isinstance(n, dict)]
    if allowed is not None:
        for n in nodes:
            if n.get("type") not in allowed:
                out.append(
                    Problem(
                        f"node type {n.get('type')!r} is not allowed here "
                        f"(allowed: {', '.join(allowed)})",
                        node_id=n.get("id") if isinstance(n.get("id"), str) else None,
                        field="type",
                    )
                )
    if max_nodes is not None and len(nodes) > max_nodes:
        out.append(Problem(f"{len(nodes)} nodes; at most {max_nodes} are allowed", field="nodes"))
    return out


def _problems_of(
    definition: dict[str, Any], ctx: Context, allowed: list[str] | None, max_nodes: int | None
) -> tuple[list[Problem], dict[str, Any]]:
    """What is still wrong, and the definition as it would be stored when nothing is."""
    problems = _extra_problems(definition, allowed, max_nodes)
    try:
        valid = validate(definition, ctx)
    except GraphInvalid as exc:
        return problems + exc.problems, definition
    return problems, valid.definition if not problems else definition


def _as_text(problems: list[Problem]) -> str:
    return "\n".join(
        "- "
        + ".".join(x for x in (p.node_id and f"nodes.{p.node_id}", p.field) if x)
        + (": " if p.node_id or p.field else "")
        + p.message
        for p in problems[:50]
    )


def _submitted(response: Any) -> tuple[str | None, dict[str, Any]]:
    for block in response.content:
        if block.type == "tool_use" and block.name == SUBMIT_TOOL:
            return block.id, dict(block.input) if isinstance(block.input, dict) else {}
    return None, {}


def _definition_of(answer: dict[str, Any]) -> dict[str, Any]:
    decoded = catalogue.decode(answer, catalogue.document_schema())
    if not isinstance(decoded, dict):
        decoded = {}
    nodes = decoded.get("nodes")
    connections = decoded.get("connections")
    settings = decoded.get("settings")
    return {
        "nodes": nodes if isinstance(nodes, list) else [],
        "connections": connections if isinstance(connections, list) else [],
        "settings": settings if isinstance(settings, dict) else {},
    }


async def rounds(
    settings: Settings,
    ctx: Context,
    system: str,
    request_text: str,
    *,
    allowed: list[str] | None,
    max_nodes: int | None,
    max_cost: float,
    spend: Spend,
    emit: Emit,
    stream: bool,
    base: dict[str, Any] | None = None,
) -> Outcome:
    """Ask, repair, validate, and ask again with the problems, until the draft is valid,
    the rounds are used up, or the spend cap is reached."""
    client = await runtime.client_for(settings)
    model = settings.generate.model or settings.anthropic.default_model
    caller = Caller(
        client=client.with_options(max_retries=0),
        settings=settings,
        model=model,
        strict_schema=catalogue.strict_document_schema(allowed),
        plain_schema=catalogue.document_schema(allowed),
        spend=spend,
        strict=settings.generate.strict_tools,
    )
    messages: list[dict[str, Any]] = [{"role": "user", "content": request_text}]
    outcome = Outcome()
    budget = runtime.Budget(max_calls=settings.anthropic.max_calls_per_run)
    try:
        for number in range(1, settings.generate.max_repair_rounds + 2):
            # An unpriced model (cost None) cannot be held to the cap; its tokens still
            # are to max_calls_per_run.
            if number > 1 and spend.cost is not None and spend.cost >= max_cost:
                outcome.stop_reason = "budget"
                break
            try:
                budget.spend()
            except runtime.BudgetExceeded:
                outcome.stop_reason = "budget"
                break
            await emit("round", {"round": number})

            async def progress(text: str, n: int = number) -> None:
                await emit("progress", {"round": n, "text": text})

            response = await caller.ask(system, messages, progress if stream else None)
            outcome.rounds = number
            use_id, answer = _submitted(response)
            if use_id is None:
                raise UpstreamError("the model did not submit a workflow")
            definition, repairs = repair.repair(repair.keep_ui_fields(_definition_of(answer), base))
            problems, stored = _problems_of(definition, ctx, allowed, max_nodes)
            outcome.name = str(answer.get("name") or outcome.name or "")[:200]
            outcome.description = str(answer.get("description") or outcome.description)[:5000]
            outcome.notes = str(answer.get("notes") or "")[:5000]
            outcome.definition, outcome.problems = stored, problems
            outcome.repairs += repairs
            await emit(
                "problems",
                {
                    "round": number,
                    "problems": [p.as_dict() for p in problems],
                    "repairs": repairs,
                    "spent": spend.as_dict(),
                },
            )
            if not problems:
                outcome.stop_reason = "valid"
                break
            feedback = (
                (
                    "I applied these repairs:\n" + "\n".join(f"- {r}" for r in repairs) + "\n"
                    if repairs
                    else ""
                )
                + "The draft is now:\n"
                + json.dumps(definition, separators=(",", ":"))
                + "\n\nThe validator still finds these problems:\n"
                + _as_text(problems)
                + f"\n\nFix them and call {SUBMIT_TOOL} again with the complete definition."
            )
            messages.append(
                {
                    "role": "assistant",
                    "content": [b.model_dump(exclude_none=True) for b in response.content],
                }
            )
            messages.append(
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": use_id,
                            "content": feedback,
                            "is_error": True,
                        }
                    ],
                }
            )
    finally:
        await client.close()
    return outcome


def _usage(spend: Spend) -> dict[str, Any]:
    return {**asdict(spend.usage)}


async def hit_limit(settings: Settings, limiter: RateLimiter, access: WorkspaceAccess) -> None:
    await limiter.hit(
        settings.generate.rate_limit, "generate", str(access.workspace.id), what="generations"
    )


async def _run(
    uow: UnitOfWork,
    settings: Settings,
    limiter: RateLimiter,
    access: WorkspaceAccess,
    data: GenerateRequest | EditRequest,
    request_text: Callable[[], str],
    emit: Emit,
    workflow_id: uuid.UUID | None,
    base: dict[str, Any] | None = None,
    *,
    limited: bool = True,
) -> tuple[Outcome, Spend]:
    allowed = check_types(data.constraints.node_types)
    max_cost = min(
        settings.generate.max_cost_usd,
        data.max_cost_usd if data.max_cost_usd is not None else settings.generate.max_cost_usd,
    )
    agents, creds = await context_lists(uow, access, data.agent_ids, data.credential_ids)
    if limited:
        await hit_limit(settings, limiter, access)
    ctx = await workflows.validation_context(uow.session, access.workspace.id, workflow_id)
    system = _system(agents, creds, allowed, data.constraints.max_nodes)
    text = request_text()
    # Nothing is written yet: end the transaction so no connection waits on the model.
    await uow.session.commit()
    spend = Spend()
    if max_cost <= 0:
        raise QuotaExceeded("the spend cap of this request is 0 USD", field="max_cost_usd")
    try:
        async with asyncio.timeout(settings.generate.timeout_s):
            outcome = await rounds(
                settings, ctx, system, text, allowed=allowed,
                max_nodes=data.constraints.max_nodes, max_cost=max_cost, spend=spend,
                emit=emit, stream=data.stream, base=base,
            )  # fmt: skip
    except TimeoutError as exc:
        raise DependencyUnavailable(
            f"generation did not finish within {settings.generate.timeout_s:.0f} s"
        ) from exc
    except QuotaExceeded as exc:
        exc.extra.update(spent=spend.as_dict())
        raise
    except anthropic.AnthropicError as exc:
        raise UpstreamError(f"the model provider failed: {type(exc).__name__}") from exc
    return outcome, spend


def _result_fields(outcome: Outcome, spend: Spend, model: str) -> dict[str, Any]:
    return {
        "name": outcome.name,
        "description": outcome.description,
        "definition": outcome.definition,
        "valid": not outcome.problems,
        "problems": [p.as_dict() for p in outcome.problems],
        "repairs": outcome.repairs,
        "rounds": outcome.rounds,
        "stop_reason": outcome.stop_reason,
        "model": spend.model or model,
        "usage": _usage(spend),
        "cost_usd": spend.cost_usd,
        "notes": outcome.notes,
        "saved": False,
    }


def _activity(
    uow: UnitOfWork,
    access: WorkspaceAccess,
    action: str,
    resource_id: uuid.UUID | None,
    outcome: Outcome,
    spend: Spend,
) -> None:
    record(
        uow.session,
        access.principal,
        workspace_id=access.workspace.id,
        action=action,
        resource_type="workflow",
        resource_id=resource_id,
        details={
            "rounds": outcome.rounds,
            "valid": not outcome.problems,
            "stop_reason": outcome.stop_reason,
            "input_tokens": spend.usage.input_tokens,
            "output_tokens": spend.usage.output_tokens,
            "cost_usd": spend.cost_usd,
            "model": spend.model,
        },
    )


async def generate(
    uow: UnitOfWork,
    settings: Settings,
    limiter: RateLimiter,
    access: WorkspaceAccess,
    data: GenerateRequest,
    emit: Emit = _nothing,
    *,
    limited: bool = True,
) -> GenerateResult:
    def text() -> str:
        return f"Build a workflow for this request:\n\n{data.prompt}"

    outcome, spend = await _run(
        uow, settings, limiter, access, data, text, emit, None, limited=limited
    )
    fields = _result_fields(outcome, spend, settings.anthropic.default_model)
    name = data.name or outcome.name or "Generated workflow"
    fields["name"] = name
    saved = None
    if data.save and not outcome.problems:
        saved = await workflows.create(
            uow,
            access,
            WorkflowCreate(
                name=name[:200],
                description=outcome.description[:5000],
                tags=["generated"],
                nodes=outcome.definition["nodes"],
                connections=outcome.definition["connections"],
                settings=outcome.definition["settings"],
            ),
        )
    _activity(uow, access, "workflow.generate", saved.id if saved else None, outcome, spend)
    return GenerateResult.model_validate({**fields, "saved": saved is not None, "workflow": saved})


def diff(before: dict[str, Any], after: dict[str, Any]) -> Diff:
    def by_id(definition: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {
            str(n["id"]): n
            for n in definition.get("nodes", [])
            if isinstance(n, dict) and isinstance(n.get("id"), str)
        }

    def edges(definition: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"source": c.get("source"), "target": c.get("target"), "branch": c.get("branch")}
            for c in definition.get("connections", [])
            if isinstance(c, dict)
        ]

    old, new = by_id(before), by_id(after)
    changed = []
    for node_id in sorted(old.keys() & new.keys()):
        a, b = old[node_id], new[node_id]
        fields = sorted(k for k in a.keys() | b.keys() if k != "config" and a.get(k) != b.get(k))
        ca, cb = a.get("config") or {}, b.get("config") or {}
        if isinstance(ca, dict) and isinstance(cb, dict):
            fields += sorted(f"config.{k}" for k in ca.keys() | cb.keys() if ca.get(k) != cb.get(k))
        elif ca != cb:
            fields.append("config")
        if fields:
            changed.append(NodeChange(id=node_id, fields=fields))
    old_edges, new_edges = edges(before), edges(after)
    return Diff(
        nodes_added=sorted(new.keys() - old.keys()),
        nodes_removed=sorted(old.keys() - new.keys()),
        nodes_changed=changed,
        connections_added=[e for e in new_edges if e not in old_edges],
        connections_removed=[e for e in old_edges if e not in new_edges],
        settings_changed=(before.get("settings") or {}) != (after.get("settings") or {}),
    )


async def edit(
    uow: UnitOfWork,
    settings: Settings,
    limiter: RateLimiter,
    access: WorkspaceAccess,
    data: EditRequest,
    emit: Emit = _nothing,
    *,
    limited: bool = True,
) -> EditResult:
    workflow: Workflow = access.resource
    if data.version is not None and data.version > workflow.current_version:
        raise ValidationFailed(
            f"version {data.version} does not exist (current: {workflow.current_version})",
            field="version",
        )
    number = data.version or workflow.current_version
    base = (await workflows.get_version(uow, access, number)).definition
    name = workflow.name

    def text() -> str:
        return (
            f"Here is the workflow {json.dumps(name)} (version {number}) as it is now:\n"
            + json.dumps(base, separators=(",", ":"))
            + "\n\nChange it as follows, keeping everything else (node ids, positions, "
            "labels) as it is:\n\n" + data.instruction
        )

    outcome, spend = await _run(
        uow, settings, limiter, access, data, text, emit, workflow.id, base, limited=limited
    )
    fields = _result_fields(outcome, spend, settings.anthropic.default_model)
    fields["name"] = name
    fields["description"] = outcome.description or workflow.description
    saved = None
    if data.save and not outcome.problems:
        saved = await workflows.update(
            uow,
            access,
            WorkflowUpdate(
                nodes=outcome.definition["nodes"],
                connections=outcome.definition["connections"],
                settings=outcome.definition["settings"],
                version=number,
            ),
            None,
        )
    _activity(uow, access, "workflow.generate_edit", workflow.id, outcome, spend)
    return EditResult.model_validate(
        {
            **fields,
            "saved": saved is not None,
            "workflow": saved,
            "base_version": number,
            "diff": diff(base, outcome.definition),
        }
    )
