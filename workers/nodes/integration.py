"""Integration nodes: `sub_workflow` runs another workflow of the workspace as a child
run (linked to this one, depth-limited, cancelled with it) and returns its output.
MCP tools arrive with the MCP issue; until then a run that reaches one fails clearly."""

from __future__ import annotations

from backend.workflows.graph import SubWorkflowIntegration
from workers.engine.retry import NodeFailure
from workers.nodes.base import NodeContext, NodeResult


async def run(ctx: NodeContext) -> NodeResult:
    config = ctx.config
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
