"""Suggestions from the model (POST /workflows/{id}/suggestions/generate): the workflow,
its run-history figures and the suggestions already open go to Claude, which answers
through a forced `submit_suggestions` tool call (strict input when the model takes it)
with patches in the operations of patch.py. Each patch is applied and validated; the
problems of those that fail go back for up to GENERATE__MAX_REPAIR_ROUNDS more answers.
Valid ones are stored as open suggestions (source `model`), the rest returned with their
problems. The client, retries, spend cap and cost accounting are the generator's
(backend/generate/model.py); no database connection is held while the model thinks.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import select

from backend.activity.service import record
from backend.agents import runtime
from backend.auth.dependencies import WorkspaceAccess
from backend.config import Settings
from backend.generate import service as generator
from backend.generate.model import Caller, Spend
from backend.kit.db import UnitOfWork
from backend.kit.errors import DependencyUnavailable, QuotaExceeded, UpstreamError
from backend.kit.lazy import lazy_module
from backend.kit.ratelimit import RateLimiter
from backend.models import Workflow, WorkflowSuggestion
from backend.suggestions import history as figures
from backend.suggestions import patch as patches
from backend.suggestions import rules
from backend.suggestions.schemas import GenerateSuggestions, GenerateSuggestionsResult, Rejected
from backend.suggestions.service import to_read
from backend.workflows import service as workflows
from backend.workflows.graph import Context, GraphInvalid, Problem, validate

if TYPE_CHECKING:
    import anthropic
else:
    # Imported on first use: see backend/kit/lazy.py.
    anthropic = lazy_module("anthropic")

TOOL = "submit_suggestions"
MODEL_KINDS = (*rules.KINDS, "reliability", "performance", "cost", "simplify", "other")
Kind = Literal[
    "missing_retry", "timeout_risk", "costly_agent", "dead_branch", "unused_credential",
    "reliability", "performance", "cost", "simplify", "other",
]  # fmt: skip


class OperationIn(BaseModel):
    """One change to the definition; fields an operation does not use are null."""

    op: Literal[
        "set_node_field", "remove_node", "add_node", "add_connection", "remove_connection",
        "set_setting",
    ]  # fmt: skip
    node_id: str | None = Field(description="set_node_field, remove_node: the node's id")
    field: str | None = Field(
        description="set_node_field, set_setting: a dotted path such as retry, timeout_s, "
        "config.model (a node) or timeout_s (a setting)"
    )
    value_json: str | None = Field(
        description="set_node_field, set_setting: the new value, JSON-encoded (null removes "
        "the field); add_node: the whole node, JSON-encoded"
    )
    source: str | None = Field(description="add_connection, remove_connection")
    target: str | None = Field(description="add_connection, remove_connection")
    branch: str | None = Field(description="add_connection, remove_connection: the label")


class SuggestionIn(BaseModel):
    kind: Kind
    reason: str = Field(description="What to change and why, in one or two sentences")
    evidence: str = Field(description="The figures from the run history that support it")
    operations: list[OperationIn]


class Submission(BaseModel):
    suggestions: list[SuggestionIn]


def _schemas() -> tuple[dict[str, Any], dict[str, Any]]:
    plain = Submission.model_json_schema()
    return anthropic.transform_schema(plain), plain


PREAMBLE = """You review workflows of Orchestration Studio and suggest concrete \
improvements to one of them: reliability (retries, timeouts, error branches), speed, \
cost (cheaper models, fewer tokens) and simplicity. Call the `{tool}` tool once with at \
most {limit} suggestions, the most valuable first; an empty list when nothing is worth \
changing. Each suggestion is a patch: a few operations on the definition you are given \
(set_node_field, remove_node, add_node, add_connection, remove_connection, set_setting). \
Quote the run-history figures that support a suggestion in its evidence. Do not repeat \
a suggestion that is already open. A node's retry policy is \
{{"max_retries": n, "backoff_s": [seconds...], "on": ["timeout", "connection", \
"rate_limited", "server_error", "overloaded"]}}.

How workflow definitions work:
"""


def system_prompt(agents: list[Any], creds: list[Any], limit: int) -> str:
    """The generator's rules of definitions (validator, templates, node kinds, the
    workspace's agents and credentials by id), under a reviewer's preamble."""
    rules_text = generator._system(agents, creds, None, None)
    marker = "Rules the validator enforces:"
    rules_text = rules_text[rules_text.find(marker) :] if marker in rules_text else rules_text
    return PREAMBLE.format(tool=TOOL, limit=limit) + rules_text


def _figures(hist: rules.History) -> dict[str, Any]:
    return {
        "window_days": hist.window_days,
        "finished_runs": hist.runs,
        "nodes": {
            node_id: {
                "rows": s.rows, "completed": s.completed, "failed": s.failed,
                "failures_by_class": s.failures, "p95_ms": s.p95_ms, "max_ms": s.max_ms,
                "cost_usd": round(s.cost_usd, 6), "branches_taken": s.branches,
            }
            for node_id, s in sorted(hist.nodes.items())
        },
    }  # fmt: skip


def _non_finite(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _text(value: str, limit: int = 5000) -> str:
    return value.replace("\x00", "")[:limit]


def to_ops(suggestion: SuggestionIn) -> list[dict[str, Any]]:
    """The stored operations of a submitted suggestion (JSON strings decoded);
    PatchError when one does not decode or is incomplete."""
    out: list[dict[str, Any]] = []
    for index, op in enumerate(suggestion.operations):
        value: Any = None
        if op.value_json not in (None, ""):
            # PostgreSQL stores neither NUL characters nor non-finite numbers in JSON:
            # refused here, as the model's mistake, not at the INSERT as a 500.
            if "\x00" in op.value_json or "\\u0000" in op.value_json:
                raise patches.PatchError("value_json holds a NUL character", index)
            try:
                value = json.loads(op.value_json, parse_constant=_non_finite)
            except ValueError as exc:
                raise patches.PatchError(f"value_json is not JSON: {exc}", index) from exc
        if op.op == "set_node_field":
            out.append({"op": op.op, "node_id": op.node_id, "field": op.field, "value": value})
        elif op.op == "remove_node":
            out.append({"op": op.op, "node_id": op.node_id})
        elif op.op == "add_node":
            out.append({"op": op.op, "node": value})
        elif op.op == "set_setting":
            out.append({"op": op.op, "field": op.field, "value": value})
        else:
            out.append({"op": op.op, "source": op.source, "target": op.target, "branch": op.branch})
    patches.parse(out)  # incomplete operations are refused here, with their index
    return out


def problems_of(
    definition: dict[str, Any], ops: list[dict[str, Any]], ctx: Context
) -> list[Problem]:
    try:
        after = validate(patches.apply(definition, ops), ctx).definition
    except patches.PatchError as exc:
        return [Problem(str(exc), field="patch")]
    except GraphInvalid as exc:
        return exc.problems
    if after == definition:
        return [Problem("the patch changes nothing", field="patch")]
    return []


def fingerprint(ops: list[dict[str, Any]]) -> str:
    canonical = json.dumps(ops, sort_keys=True, separators=(",", ":"), default=str)
    return "model:" + hashlib.sha256(canonical.encode()).hexdigest()[:40]


def _submitted(response: Any) -> tuple[str | None, Any]:
    for block in response.content:
        if block.type == "tool_use" and block.name == TOOL:
            return block.id, block.input
    return None, None


async def _ask(
    settings: Settings,
    system: str,
    first: str,
    definition: dict[str, Any],
    ctx: Context,
    *,
    limit: int,
    max_cost: float,
    spend: Spend,
) -> tuple[list[tuple[SuggestionIn, list[dict[str, Any]]]], list[Rejected], int]:
    """Rounds until every submitted suggestion validates, the repair rounds are used up,
    or the spend cap is reached: the valid ones with their operations, the rejected
    ones of the last answer, and the answers it took."""
    client = await runtime.client_for(settings)
    strict, plain = _schemas()
    caller = Caller(
        client=client.with_options(max_retries=0),
        settings=settings,
        model=settings.generate.model or settings.anthropic.default_model,
        strict_schema=strict,
        plain_schema=plain,
        spend=spend,
        strict=settings.generate.strict_tools,
        tool_name=TOOL,
        tool_description="Submit your suggestions for the workflow, each with its patch.",
    )
    messages: list[dict[str, Any]] = [{"role": "user", "content": first}]
    valid: list[tuple[SuggestionIn, list[dict[str, Any]]]] = []
    rejected: list[Rejected] = []
    budget = runtime.Budget(max_calls=settings.anthropic.max_calls_per_run)
    answers = 0
    try:
        for number in range(1, settings.generate.max_repair_rounds + 2):
            if number > 1 and spend.cost is not None and spend.cost >= max_cost:
                break
            try:
                budget.spend()
            except runtime.BudgetExceeded:
                break
            response = await caller.ask(system, messages)
            answers = number
            use_id, answer = _submitted(response)
            if use_id is None:
                raise UpstreamError("the model did not submit suggestions")
            try:
                submitted = Submission.model_validate(answer).suggestions
            except ValidationError as exc:
                submitted = []
                problem = Problem(f"the answer does not fit the tool's schema: {exc}"[:1000])
                rejected = [
                    Rejected.model_validate(
                        {"kind": "other", "reason": "", "problems": [problem.as_dict()]}
                    )
                ]
            else:
                rejected = []
            retry: list[str] = []
            for index, suggestion in enumerate(submitted):
                try:
                    ops = to_ops(suggestion)
                    found = problems_of(definition, ops, ctx)
                except patches.PatchError as exc:
                    found = [Problem(str(exc), field="patch")]
                if not found:
                    # A repair round may repeat one that was already fine: kept once.
                    if len(valid) < limit and all(
                        fingerprint(o) != fingerprint(ops) for _, o in valid
                    ):
                        valid.append((suggestion, ops))
                    continue
                if found:
                    rejected.append(
                        Rejected.model_validate(
                            {"kind": suggestion.kind, "reason": suggestion.reason,
                             "problems": [p.as_dict() for p in found]}
                        )
                    )  # fmt: skip
                    retry.append(
                        f"Suggestion {index + 1} ({suggestion.kind}): "
                        + "; ".join(
                            (f"nodes.{p.node_id}." if p.node_id else "")
                            + (f"{p.field}: " if p.field else "")
                            + p.message
                            for p in found[:10]
                        )
                    )
            if not retry or len(valid) >= limit:
                break
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
                            "is_error": True,
                            "content": (
                                "These patches do not apply to the definition or do not "
                                "validate:\n"
                                + "\n".join(f"- {r}" for r in retry)
                                + f"\n\nCall {TOOL} again with corrected versions of these "
                                "suggestions only (the others are kept), or an empty list."
                            ),
                        }
                    ],
                }
            )
    finally:
        await client.close()
    return valid, rejected, answers


async def generate(
    uow: UnitOfWork,
    settings: Settings,
    limiter: RateLimiter,
    access: WorkspaceAccess,
    data: GenerateSuggestions,
) -> GenerateSuggestionsResult:
    session = uow.session
    workflow: Workflow = access.resource
    # No key is a 424 before anything is counted against the rate limit.
    await (await runtime.client_for(settings)).close()
    max_cost = min(
        settings.generate.max_cost_usd,
        data.max_cost_usd if data.max_cost_usd is not None else settings.generate.max_cost_usd,
    )
    if max_cost <= 0:
        raise QuotaExceeded("the spend cap of this request is 0 USD", field="max_cost_usd")
    await generator.hit_limit(settings, limiter, access)
    agents, creds = await generator.context_lists(uow, access, None, None)
    facts = await figures.workspace_facts(session, workflow.workspace_id)
    hist = await figures.history(
        session, workflow.id, facts, now=datetime.now(UTC),
        window_days=settings.generate.suggestions_window_days,
    )  # fmt: skip
    ctx = await workflows.validation_context(session, workflow.workspace_id, workflow.id)
    base_version = workflow.current_version
    definition = (await workflows.current_version(session, workflow)).definition
    open_rows = (
        await session.scalars(
            select(WorkflowSuggestion).where(
                WorkflowSuggestion.workflow_id == workflow.id, WorkflowSuggestion.status == "open"
            )
        )
    ).all()
    limit = settings.generate.suggestions_max_generated
    system = system_prompt(agents, creds, limit)
    first = (
        f"The workflow {json.dumps(workflow.name)} (version {base_version}):\n"
        + json.dumps(definition, separators=(",", ":"))
        + "\n\nIts run history:\n"
        + json.dumps(_figures(hist), separators=(",", ":"))
        + "\n\nSuggestions already open (do not repeat them):\n"
        + ("\n".join(f"- {r.kind}: {r.reason}" for r in open_rows) or "(none)")
        + "\n\n"
        + (data.instruction or "Suggest what would most improve this workflow.")
    )
    # Nothing is written yet: end the transaction so no connection waits on the model.
    await session.commit()
    spend = Spend()
    try:
        async with asyncio.timeout(settings.generate.timeout_s):
            valid, rejected, answers = await _ask(
                settings, system, first, definition, ctx,
                limit=limit, max_cost=max_cost, spend=spend,
            )  # fmt: skip
    except TimeoutError as exc:
        raise DependencyUnavailable(
            f"the suggestions did not come within {settings.generate.timeout_s:.0f} s"
        ) from exc
    except QuotaExceeded as exc:
        exc.extra.update(spent=spend.as_dict())
        raise
    except anthropic.AnthropicError as exc:
        raise UpstreamError(f"the model provider failed: {type(exc).__name__}") from exc
    model = spend.model or settings.generate.model or settings.anthropic.default_model
    rows = await _store(session, workflow, base_version, valid, model)
    record(
        session,
        access.principal,
        workspace_id=workflow.workspace_id,
        action="workflow.suggestions.generate",
        resource_type="workflow",
        resource_id=workflow.id,
        details={
            "suggestions": [str(r.id) for r in rows],
            "rejected": len(rejected),
            "rounds": answers,
            "input_tokens": spend.usage.input_tokens,
            "output_tokens": spend.usage.output_tokens,
            "cost_usd": spend.cost_usd,
            "model": model,
        },
    )
    await session.refresh(workflow)
    return GenerateSuggestionsResult.model_validate(
        {
            "items": await to_read(session, workflow, rows),
            "rejected": rejected,
            "rounds": answers,
            "model": model,
            "usage": asdict(spend.usage),
            "cost_usd": spend.cost_usd,
        }
    )


async def _store(
    session: Any,
    workflow: Workflow,
    base_version: int,
    valid: list[tuple[SuggestionIn, list[dict[str, Any]]]],
    model: str,
) -> list[WorkflowSuggestion]:
    """New suggestions are added open; one the workflow already has (the same patch)
    comes back as it is: an open one with the new reason, a decided one untouched."""
    wanted = {fingerprint(ops): (s, ops) for s, ops in valid}
    existing = {
        r.fingerprint: r
        for r in (
            await session.scalars(
                select(WorkflowSuggestion)
                .where(
                    WorkflowSuggestion.workflow_id == workflow.id,
                    WorkflowSuggestion.fingerprint.in_(list(wanted)),
                )
                .with_for_update()
            )
        ).all()
    }
    rows: list[WorkflowSuggestion] = []
    for key, (suggestion, ops) in wanted.items():
        content = {
            "kind": suggestion.kind,
            "reason": _text(suggestion.reason),
            "evidence": {"summary": _text(suggestion.evidence), "model": model},
            "base_version": base_version,
        }
        row = existing.get(key)
        if row is None:
            row = WorkflowSuggestion(
                id=uuid.uuid4(),
                workspace_id=workflow.workspace_id,
                workflow_id=workflow.id,
                fingerprint=key,
                source="model",
                status="open",
                patch=ops,
                **content,
            )
            session.add(row)
        elif row.status == "open":
            for name, value in content.items():
                setattr(row, name, value)
        rows.append(row)
    await session.flush()
    return rows
