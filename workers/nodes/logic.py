"""Logic nodes: if, switch, merge, set, transform. (for_each and while run bodies and
belong with sub-runs; until then they fail clearly instead of pretending.)"""

from __future__ import annotations

from backend.workflows.graph import IfLogic, MergeLogic, SetLogic, SwitchLogic, TransformLogic
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
    raise NodeFailure(
        f"logic kind {config.kind!r} is not supported by this engine yet", "permanent"
    )
