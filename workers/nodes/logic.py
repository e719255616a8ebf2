"""Logic nodes: if, switch, merge, set, transform, the loops: for_each (once per item)
and while (while a condition holds, up to max_iterations), and the steps that wait:
approval (a person decides a task) and wait (a duration, a time, or a call to a
one-time resume URL). A loop's body is a small graph or another workflow; the engine
runs it and checkpoints every pass. A waiting step returns `waits`: the engine parks
the run (no worker slot held) and runs the step again when the run is woken or due,
and the step looks at what it waits for once more."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from backend.inbox import links
from backend.inbox.service import TaskSpec, approval_step
from backend.models import ActionLink
from backend.workflows.graph import (
    ApprovalLogic,
    ForEachLogic,
    IfLogic,
    MergeLogic,
    SetLogic,
    SwitchLogic,
    TransformLogic,
    WaitLogic,
    WhileLogic,
)
from backend.workflows.templates import TemplateLimit, evaluate
from workers.engine.retry import NodeFailure
from workers.nodes.base import NodeContext, NodeResult


async def run(ctx: NodeContext) -> NodeResult:
    config = ctx.config
    if isinstance(config, IfLogic):
        value = bool(ctx.evaluate(config.condition))
        return NodeResult(output={"result": value}, branch="true" if value else "false")
    if isinstance(config, SwitchLogic):
        for case in config.cases:
            if ctx.evaluate(case.when):
                return NodeResult(output={"branch": case.branch}, branch=case.branch)
        return NodeResult(output={"branch": "default"}, branch="default")
    if isinstance(config, MergeLogic):
        inputs = ctx.scope["inputs"]
        return NodeResult(output={name: ctx.scope["nodes"][name]["output"] for name in inputs})
    if isinstance(config, SetLogic):
        values = {name: ctx.render_json(source) for name, source in config.variables.items()}
        return NodeResult(output=values, variables=values)
    if isinstance(config, TransformLogic):
        return NodeResult(output=ctx.render_json(config.template))
    if isinstance(config, ApprovalLogic):
        return await _approval(ctx, config)
    if isinstance(config, WaitLogic):
        return await _wait(ctx, config)
    if isinstance(config, ForEachLogic | WhileLogic) and ctx.run_body is not None:
        if isinstance(config, WhileLogic):
            return await _while(ctx, config, ctx.run_body)
        return await _for_each(ctx, config, ctx.run_body)
    raise NodeFailure(f"logic kind {config.kind!r} has no body to run", "permanent")


RunBody = Callable[[int, dict[str, Any]], Awaitable[Any]]


async def _while(ctx: NodeContext, config: WhileLogic, run_body: RunBody) -> NodeResult:
    """Pass i sees `iteration` = i and `last` = the previous pass's output. A resumed run
    replays finished passes from their checkpoints, so the condition sees the same
    values again and the loop picks up where it stopped."""
    last: Any = None
    for iteration in range(config.max_iterations + 1):
        loop_scope = {"iteration": iteration, "last": last}
        try:
            scope = {**ctx.scope, **loop_scope}
            holds = bool(evaluate(config.condition, scope, deadline=ctx.deadline))
        except TemplateLimit as exc:
            raise NodeFailure(f"condition stopped: {exc}", "permanent") from exc
        except Exception as exc:
            raise NodeFailure(
                f"condition failed: {type(exc).__name__}: {exc}", "permanent"
            ) from exc
        if not holds:
            return NodeResult(output={"iterations": iteration, "last": last})
        if iteration == config.max_iterations:
            break
        last = await run_body(iteration, loop_scope)
    # A loop stopped by its bound did not finish its job: say so instead of passing
    # off the last pass as the answer.
    raise NodeFailure(
        f"while: the condition still held after max_iterations ({config.max_iterations})",
        "permanent",
    )


async def _for_each(ctx: NodeContext, config: ForEachLogic, run_body: RunBody) -> NodeResult:
    items = ctx.evaluate(config.items)
    if isinstance(items, dict):
        items = list(items.items())
    if not isinstance(items, list | tuple):
        raise NodeFailure(f"items must be a list, not {type(items).__name__}", "permanent")
    if len(items) > config.max_items:
        raise NodeFailure(f"{len(items)} items, over max_items ({config.max_items})", "permanent")
    limit = asyncio.Semaphore(config.max_concurrency)

    async def one(index: int, item: Any) -> Any:
        async with limit:
            return await run_body(index, {"item": item, "index": index})

    # A task group cancels the other items as soon as one fails; results keep order.
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(i, item)) for i, item in enumerate(items)]
    except* NodeFailure as failures:
        raise failures.exceptions[0] from None
    return NodeResult(output=[task.result() for task in tasks])


# Steps that wait ---------------------------------------------------------------------------


async def _approval(ctx: NodeContext, config: ApprovalLogic) -> NodeResult:
    spec = TaskSpec(
        title=ctx.render(config.title),
        message=ctx.render(config.message) if config.message else "",
        data=ctx.render_tree(config.data),
        form=config.form,
        assignees=list(config.assignees),
        min_role=config.min_role,
        expires_in=config.expires_in,
        on_timeout=config.on_timeout,
        notify=config.notify,
    )
    found = await approval_step(
        ctx.sessionmaker,
        ctx.settings,
        workspace_id=ctx.workspace_id,
        workflow_id=uuid.UUID(str(ctx.scope["execution"]["workflow_id"])),
        execution_id=ctx.execution_id,
        node_id=ctx.key or ctx.node.id,
        iteration=ctx.iteration or 0,
        spec=spec,
    )
    if found.failure is not None:
        raise NodeFailure(found.failure, "permanent")
    if found.decision is not None:
        return NodeResult(output=found.decision, branch=str(found.decision["decision"]))
    ctx.log("waiting for a decision", task_id=str(found.task_id))
    return NodeResult(
        output={"task_id": str(found.task_id), "status": "open"},
        waits=True,
        wait_until=found.expires_at,
    )


def _parse_time(text: Any) -> datetime:
    if isinstance(text, datetime):
        moment = text
    else:
        try:
            moment = datetime.fromisoformat(str(text).strip().replace("Z", "+00:00"))
        except ValueError:
            raise NodeFailure(
                f"until: {str(text)[:100]!r} is not an ISO 8601 date and time", "permanent"
            ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


async def _wait(ctx: NodeContext, config: WaitLogic) -> NodeResult:
    now = datetime.now(UTC)
    since = ctx.waiting_since or now
    if config.duration_s is not None or config.until is not None:
        if config.duration_s is not None:
            until = since + timedelta(seconds=config.duration_s)
        else:
            until = _parse_time(ctx.render(config.until or ""))
        output = {"until": until.isoformat(), "waited_s": round((now - since).total_seconds(), 3)}
        if until <= now:
            return NodeResult(output=output)
        return NodeResult(output=output, waits=True, wait_until=until)
    node_id, iteration = ctx.key or ctx.node.id, ctx.iteration or 0
    async with ctx.sessionmaker() as session:
        used = await session.scalar(
            select(ActionLink).where(
                ActionLink.execution_id == ctx.execution_id,
                ActionLink.node_id == node_id,
                ActionLink.iteration == iteration,
                ActionLink.purpose == "resume",
                ActionLink.used_at.is_not(None),
            )
        )
    if used is not None:
        output = {"resumed": True, "body": used.body, "resumed_at": used.used_at}
        return NodeResult(output=_jsonable(output), branch="resumed")
    deadline = since + timedelta(seconds=config.timeout_s) if config.timeout_s else None
    if deadline is not None and deadline <= now:
        return NodeResult(output={"resumed": False, "timed_out": True}, branch="timed_out")
    url = links.resume_url(ctx.settings, ctx.execution_id, node_id, iteration)
    if ctx.waiting_since is None:
        ctx.log("waiting for a call to the resume URL", resume_url=url)
    output = {"resume_url": url, "timeout_at": deadline.isoformat() if deadline else None}
    return NodeResult(output=output, waits=True, wait_until=deadline)


def _jsonable(value: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in value.items()}
