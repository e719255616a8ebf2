"""Integration nodes: `sub_workflow` runs another workflow of the workspace as a child
run (linked to this one, depth-limited, cancelled with it) and returns its output;
`mcp_tool` calls one approved tool of a registered MCP server with templated arguments
(validated against the tool's stored input schema) and outputs its structured content."""

from __future__ import annotations

import time
from typing import Any

from backend.mcp import runtime as mcp
from backend.mcp.client import McpFailure
from backend.mcp.service import Unavailable
from backend.workflows.graph import McpToolIntegration, SubWorkflowIntegration
from workers.engine.retry import ErrorClass, NodeFailure
from workers.nodes.base import NodeContext, NodeResult


async def mcp_tool(ctx: NodeContext, config: McpToolIntegration) -> NodeResult:
    # Rendered values that read as JSON (numbers, lists, objects) are passed as such, so
    # `{{ nodes.a.output.count }}` reaches an integer parameter as an integer.
    arguments: dict[str, Any] = {k: ctx.render_json(v) for k, v in config.arguments.items()}
    try:
        async with ctx.sessionmaker() as session:
            server, tool = await mcp.resolve(
                session, ctx.workspace_id, config.server_id, config.tool
            )
    except Unavailable as exc:
        raise NodeFailure(str(exc), "permanent") from None
    started = time.perf_counter()
    try:
        answer = await mcp.call(ctx.settings, server, tool, arguments)
    except mcp.ArgumentsInvalid as exc:
        raise NodeFailure(str(exc), "permanent") from None
    except McpFailure as exc:
        # Timeouts and dropped connections are worth the node's retry policy; a refused
        # address, an unknown tool or the tool's own error are not.
        kind: ErrorClass = (
            "timeout" if exc.timeout else "connection" if exc.transient else "permanent"
        )
        raise NodeFailure(str(exc), kind) from None
    duration_ms = round((time.perf_counter() - started) * 1000, 2)
    ctx.log(f"MCP {server.name}/{tool.name} answered", duration_ms=duration_ms)
    structured = answer["structured"]
    return NodeResult(
        output={
            "server": server.name,
            "tool": tool.name,
            "result": structured if structured is not None else answer["text"],
            "text": answer["text"],
            "duration_ms": duration_ms,
        }
    )


async def run(ctx: NodeContext) -> NodeResult:
    config = ctx.config
    if isinstance(config, McpToolIntegration):
        return await mcp_tool(ctx, config)
    if isinstance(config, SubWorkflowIntegration) and ctx.run_workflow is not None:
        data = {name: ctx.render_json(source) for name, source in config.input.items()}
        child = await ctx.run_workflow(config.workflow_id, data, config.wait)
        if not config.wait:
            return NodeResult(output={"execution_id": str(child.execution_id)})
        if child.status != "completed":
            reason = (child.error or {}).get("message", "")
            raise NodeFailure(
                f"sub-workflow run {child.execution_id} {child.status}: {reason}".rstrip(": "),
                "permanent",
            )
        return NodeResult(output=child.output)
    raise NodeFailure(
        f"integration kind {config.kind!r} is not supported by this engine yet", "permanent"
    )
