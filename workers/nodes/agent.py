"""Agent nodes: one turn of the agent runtime (the same the API's agent test uses), with
the node's overrides; tokens and cost go on the node and the run."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from backend.agents import runtime
from backend.agents.service import build_spec
from backend.kit.errors import QuotaExceeded
from backend.models import Agent
from backend.quotas import service as quotas
from backend.workflows.graph import AgentConfig
from workers.engine.retry import NodeFailure, classify
from workers.nodes.base import NodeContext, NodeResult


class Deltas:
    """The model's text as it is written, as `agent.delta` events: batched by size and
    time, so a long answer is tens of events, not thousands (the node's output stays
    the whole message)."""

    MAX_CHARS = 400
    MAX_WAIT_S = 0.1

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.parts: list[str] = []
        self.size = 0
        self.sent = 0
        self.since = time.monotonic()

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text)
        if self.size >= self.MAX_CHARS or time.monotonic() - self.since >= self.MAX_WAIT_S:
            self.flush()

    def flush(self) -> None:
        if self.parts and self.ctx.emit is not None:
            text = "".join(self.parts)
            self.ctx.emit("agent.delta", {"text": text, "offset": self.sent})
            self.sent += len(text)
        self.parts, self.size, self.since = [], 0, time.monotonic()


async def run(ctx: NodeContext) -> NodeResult:
    config: AgentConfig = ctx.config
    prompt = ctx.render(config.prompt)
    settings = ctx.settings
    client = await runtime.client_for(settings)
    budget = runtime.Budget(
        max_calls=settings.anthropic.max_calls_per_run, prices=settings.anthropic.prices
    )
    result = runtime.AgentResult(output="", stop_reason="", iterations=0, model=config.model or "")
    subs = runtime.AgentResult(output="", stop_reason="", iterations=0, model=config.model or "")
    try:  # the workspace's monthly AI tokens and cost (QUOTAS__*): no call past them
        async with ctx.sessionmaker() as session:
            await quotas.check_ai(session, ctx.workspace_id, settings)
    except QuotaExceeded as exc:
        await client.close()
        raise NodeFailure(str(exc), "permanent") from exc
    try:
        if config.agent_id is not None:
            async with ctx.sessionmaker() as session:
                agent = await session.get(Agent, config.agent_id)
                if agent is None or agent.workspace_id != ctx.workspace_id:
                    raise NodeFailure("agent not found in this workspace", "permanent")
                spec = await build_spec(
                    session,
                    client,
                    agent,
                    max_iterations=config.max_iterations,
                    budget=budget,
                    spent=subs,
                    http=ctx.http,
                    settings=settings,
                )
        else:
            spec = runtime.AgentSpec(
                model=config.model or settings.anthropic.default_model,
                system_prompt="",
                max_tokens=1024,
                temperature=None,
                tools=[],
                max_iterations=config.max_iterations,
            )
        overrides: dict[str, Any] = {
            "model": config.model,
            "system_prompt": ctx.render(config.system_prompt) if config.system_prompt else None,
            "temperature": config.temperature,
            "max_tokens": config.max_tokens,
        }
        spec = dataclasses.replace(spec, **{k: v for k, v in overrides.items() if v is not None})
        result.model = spec.model
        deltas = Deltas(ctx) if ctx.emit is not None else None
        try:
            await runtime.run(
                client,
                spec,
                prompt,
                budget=budget,
                result=result,
                on_text=deltas.add if deltas else None,
            )
        finally:
            if deltas:
                deltas.flush()
    except NodeFailure:
        raise
    except runtime.BudgetExceeded as exc:
        raise NodeFailure(str(exc), "permanent") from exc
    except Exception as exc:
        raise classify(exc) from exc
    finally:
        await client.close()
    tokens_in = result.usage.input_tokens + subs.usage.input_tokens
    tokens_out = result.usage.output_tokens + subs.usage.output_tokens
    cost = (result.cost or 0.0) + (subs.cost or 0.0)
    await quotas.spend_ai(ctx.workspace_id, tokens_in + tokens_out, cost)
    if result.stop_reason == "max_iterations":
        # A loop that hit its cap ends as a failure, not as a quiet success.
        raise NodeFailure(f"agent stopped at max_iterations ({config.max_iterations})", "permanent")
    return NodeResult(
        output={
            "text": result.output,
            "stop_reason": result.stop_reason,
            "iterations": result.iterations,
            "model": result.model,
            "tool_calls": [dataclasses.asdict(c) for c in result.tool_calls],
            # The Messages API's usage names: analytics sums the cache figures from here.
            "usage": {
                "input_tokens": tokens_in,
                "output_tokens": tokens_out,
                "cache_read_input_tokens": result.usage.cache_read_input_tokens
                + subs.usage.cache_read_input_tokens,
                "cache_creation_input_tokens": result.usage.cache_creation_input_tokens
                + subs.usage.cache_creation_input_tokens,
            },
        },
        input_tokens=tokens_in,
        output_tokens=tokens_out,
        cost_usd=cost,
    )
