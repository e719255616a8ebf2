"""Loop bodies (for_each, while): how a loop node runs its body for pass `index`.

A body graph's nodes are checkpointed as `<loop>.<node>` with iteration = index + 1, so
a resumed loop reuses every pass that finished; a body workflow runs as one child run
per pass. A body node's short retries happen in place; a failure (or a long wait) goes
up to the loop node, whose own retry policy decides."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from backend.config import Settings
from backend.executions import repository as repo
from backend.executions.lifecycle import Claim
from backend.executions.state import ExecutionStatus, NodeStatus
from backend.workflows.graph import ForEachLogic, ValidGraph, WhileLogic
from workers.engine.attempt import attempt_node
from workers.engine.checkpoints import Checkpoints, now
from workers.engine.dag import NodeState, skip_closure
from workers.engine.graphs import body_graph
from workers.engine.retry import NodeFailure
from workers.engine.subruns import SubRuns
from workers.nodes import HANDLERS
from workers.nodes.base import NodeContext, NodeResult

E, N = ExecutionStatus, NodeStatus
RunPass = Callable[[int, dict[str, Any]], Awaitable[Any]]
Timeout = Callable[[ValidGraph, float | None], float]


class Loops:
    def __init__(
        self,
        settings: Settings,
        checkpoints: Checkpoints,
        subruns: SubRuns,
        context: Callable[..., NodeContext],
    ) -> None:
        self.settings = settings
        self.checkpoints = checkpoints
        self.subruns = subruns
        # Builds a NodeContext the way the runner does (claim, node, config, scope, id).
        self.context = context

    async def body_runner(
        self,
        claim: Claim,
        graph: ValidGraph,
        parent: str,
        config: ForEachLogic | WhileLogic,
        scope: dict[str, Any],
        ctx: NodeContext,
        time_limit: Timeout,
    ) -> RunPass:
        if config.workflow_id is not None:
            workflow_id = config.workflow_id

            async def run_child(index: int, names: dict[str, Any]) -> Any:
                child = await self.subruns.run(
                    claim, parent, index + 1, ctx, workflow_id, names, True
                )
                if child.status != E.COMPLETED:
                    reason = (child.error or {}).get("message", "")
                    raise NodeFailure(
                        f"pass {index}: sub-workflow run {child.execution_id} {child.status}: "
                        f"{reason}".rstrip(": "),
                        "permanent",
                    )
                return child.output

            return run_child
        body = body_graph(graph, parent, config, claim.workflow_id)
        done: dict[tuple[str, int], tuple[Any, str | None]] = {}
        async with self.checkpoints.sessionmaker() as session:
            for node_id, iteration, output, branch in await repo.completed_body_nodes(
                session, claim.id, parent
            ):
                done[(node_id.split(".", 1)[1], iteration)] = (output, branch)

        async def run_pass(index: int, names: dict[str, Any]) -> Any:
            states: dict[str, NodeState] = {}
            outputs: dict[str, Any] = {}
            while True:
                ready, states = skip_closure(body.graph, states)
                if not ready:
                    break
                for node_id in ready:
                    if (node_id, index + 1) in done:
                        outputs[node_id], branch = done[(node_id, index + 1)]
                        states[node_id] = NodeState(N.COMPLETED, branch)
                        continue
                    pass_scope = {
                        **scope,
                        **names,
                        "nodes": {
                            **scope["nodes"],
                            **{n: {"output": o} for n, o in outputs.items()},
                        },
                    }
                    result = await self._body_step(
                        claim, body, parent, node_id, index + 1, pass_scope, time_limit
                    )
                    # Remembered, so an in-place retry of the loop skips it too.
                    done[(node_id, index + 1)] = (result.output, result.branch)
                    outputs[node_id] = result.output
                    states[node_id] = NodeState(N.COMPLETED, result.branch)
            sinks = [n for n in body.graph.nodes if body.graph.out_degree(n) == 0 and n in outputs]
            return outputs[sinks[0]] if len(sinks) == 1 else {n: outputs[n] for n in sinks}

        return run_pass

    async def _body_step(
        self,
        claim: Claim,
        body: ValidGraph,
        parent: str,
        node_id: str,
        iteration: int,
        scope: dict[str, Any],
        time_limit: Timeout,
    ) -> NodeResult:
        """One body node for one pass."""
        node = body.nodes[node_id]
        key = f"{parent}.{node_id}"
        ctx = self.context(claim, node, body.configs[node_id], scope, key, iteration)
        done = await attempt_node(
            ctx,
            HANDLERS[node.type],
            policy=node.retry,
            settings=self.settings,
            time_limit=functools.partial(time_limit, body, node.timeout_s),
        )
        if done.failure is not None:
            await self.checkpoints.write(
                claim,
                key,
                N.RUNNING,
                N.FAILED,
                {
                    "attempt": done.attempt,
                    "error": done.error(),
                    "started_at": done.started,
                    "finished_at": now(),
                },
                iteration=iteration,
            )
            raise NodeFailure(
                f"{node_id} (item {iteration - 1}): {done.failure.message}",
                done.failure.error_class,
                done.retry_in,
            ) from done.failure
        result = done.result
        assert result is not None
        await self.checkpoints.write(
            claim,
            key,
            N.RUNNING,
            N.COMPLETED,
            {
                "branch": result.branch,
                "attempt": done.attempt,
                "output": result.output,
                "started_at": done.started,
                "finished_at": now(),
                "input_tokens": result.input_tokens,
                "output_tokens": result.output_tokens,
                "cost_usd": result.cost_usd,
            },
            iteration=iteration,
            size=done.size,
        )
        return result
