"""Trigger nodes: the run's input, as given."""

from __future__ import annotations

from workers.nodes.base import NodeContext, NodeResult


async def run(ctx: NodeContext) -> NodeResult:
    return NodeResult(output=ctx.scope["trigger"])
