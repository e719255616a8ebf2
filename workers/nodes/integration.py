"""Integration nodes. Sub-workflows and MCP tools arrive with their own issues; until
then a run that reaches one fails clearly, naming what is missing."""

from __future__ import annotations

from workers.engine.retry import NodeFailure
from workers.nodes.base import NodeContext, NodeResult


async def run(ctx: NodeContext) -> NodeResult:
    raise NodeFailure(
        f"integration kind {ctx.config.kind!r} is not supported by this engine yet", "permanent"
    )
