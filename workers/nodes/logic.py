"""Logic nodes: if, switch, merge, set, transform, and the loops: for_each (once per
item) and while (while a condition holds, up to max_iterations). A loop's body is a
small graph or another workflow; the engine runs it and checkpoints every pass."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from backend.workflows.graph import (
    ForEachLogic,
    IfLogic,
    MergeLogic,
    SetLogic,
    SwitchLogic,
    TransformLogic,
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
