"""Logic nodes: if, switch, merge, set, transform, and for_each over a body graph
(run by the engine, one checkpointed iteration per item). `while` and for_each over a
sub-workflow arrive with sub-runs; until then they fail clearly instead of pretending."""

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
)
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
    if isinstance(config, ForEachLogic) and ctx.run_body is not None:
        return await _for_each(ctx, config, ctx.run_body)
    raise NodeFailure(
        f"logic kind {config.kind!r} is not supported by this engine yet", "permanent"
    )


async def _for_each(
    ctx: NodeContext, config: ForEachLogic, run_body: Callable[[int, Any], Awaitable[Any]]
) -> NodeResult:
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
            return await run_body(index, item)

    # A task group cancels the other items as soon as one fails; results keep order.
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(i, item)) for i, item in enumerate(items)]
    except* NodeFailure as failures:
        raise failures.exceptions[0] from None
    return NodeResult(output=[task.result() for task in tasks])
