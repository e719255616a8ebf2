"""Agents: reusable definitions in a workspace, and a test turn through the runtime."""

from __future__ import annotations

import asyncio
import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.activity.service import record
from backend.agents import runtime
from backend.agents.schemas import AgentCreate, AgentTest, AgentTestResult, AgentUpdate
from backend.auth.dependencies import WorkspaceAccess
from backend.config import Settings
from backend.kit.db import UnitOfWork
from backend.kit.errors import (
    Conflict,
    DependencyUnavailable,
    QuotaExceeded,
    RateLimited,
    UpstreamError,
    ValidationFailed,
)
from backend.kit.http_guard import guarded_client
from backend.kit.lazy import lazy_module
from backend.kit.repository import Repository
from backend.mcp import runtime as mcp_runtime
from backend.models import Agent, McpServer
from backend.tools import web
from backend.workflows.service import workflows_using

if TYPE_CHECKING:
    import anthropic
else:
    # Imported on first use: see backend/kit/lazy.py.
    anthropic = lazy_module("anthropic")

MAX_SUB_AGENT_DEPTH = 3


class AgentRepository(Repository[Agent]):
    model = Agent


async def _check_sub_agents(
    session: AsyncSession, workspace_id: uuid.UUID, agent_id: uuid.UUID, subs: list[uuid.UUID]
) -> None:
    if agent_id in subs:
        raise ValidationFailed("an agent cannot call itself", field="sub_agents")
    rows = await session.execute(
        select(Agent.id, Agent.sub_agents).where(Agent.workspace_id == workspace_id)
    )
    graph = {row_id: [uuid.UUID(s) for s in row_subs] for row_id, row_subs in rows.all()}
    missing = [s for s in subs if s not in graph]
    if missing:
        raise ValidationFailed(
            f"sub-agent {missing[0]} not found in this workspace", field="sub_agents"
        )
    graph[agent_id] = list(subs)
    # Calls that come back round to this agent would loop (and bill) forever.
    stack, seen = list(subs), set()
    while stack:
        current = stack.pop()
        if current == agent_id:
            raise ValidationFailed(
                "sub-agents would call this agent again (a cycle)", field="sub_agents"
            )
        if current not in seen:
            seen.add(current)
            stack.extend(graph.get(current, []))


async def _check_mcp_servers(
    session: AsyncSession, workspace_id: uuid.UUID, tools: list[Any] | None
) -> None:
    """MCP tool entries name servers of this workspace."""
    for index, tool in enumerate(tools or []):
        server_id = getattr(tool, "server_id", None)
        if server_id is None:
            continue
        server = await session.get(McpServer, server_id)
        if server is None or server.workspace_id != workspace_id:
            raise ValidationFailed(
                "MCP server not found in this workspace", field=f"tools[{index}].server_id"
            )


def _fields(data: AgentCreate | AgentUpdate) -> dict[str, Any]:
    values = data.model_dump(exclude_unset=True, mode="json")
    if "metadata" in values:
        values["meta"] = values.pop("metadata")
    return values


async def create(
    uow: UnitOfWork, settings: Settings, access: WorkspaceAccess, data: AgentCreate
) -> Agent:
    agent_id = uuid.uuid4()
    await _check_sub_agents(uow.session, access.workspace.id, agent_id, data.sub_agents)
    await _check_mcp_servers(uow.session, access.workspace.id, data.tools)
    values = _fields(data)
    values.setdefault("model", settings.anthropic.default_model)
    if values["model"] is None:
        values["model"] = settings.anthropic.default_model
    agent = Agent(
        id=agent_id,
        workspace_id=access.workspace.id,
        created_by=access.user.id,
        **{"max_tokens": data.max_tokens, **values},
    )
    uow.session.add(agent)
    await uow.session.flush()
    record(
        uow.session,
        access.principal,
        workspace_id=access.workspace.id,
        action="agent.create",
        resource_type="agent",
        resource_id=agent.id,
        details={"name": agent.name},
    )
    return agent


async def list_agents(
    uow: UnitOfWork, access: WorkspaceAccess, *, q: str | None, limit: int, offset: int
) -> tuple[Sequence[Agent], int]:
    stmt = select(Agent).where(Agent.workspace_id == access.workspace.id)
    if q:
        # autoescape: a % or _ in the query is a character, not a wildcard.
        stmt = stmt.where(Agent.name.icontains(q, autoescape=True))
    return await AgentRepository(uow.session).paginate(
        stmt.order_by(Agent.name, Agent.id), limit=limit, offset=offset
    )


async def update(uow: UnitOfWork, access: WorkspaceAccess, data: AgentUpdate) -> Agent:
    agent: Agent = access.resource
    if data.sub_agents is not None:
        await _check_sub_agents(uow.session, agent.workspace_id, agent.id, data.sub_agents)
    await _check_mcp_servers(uow.session, agent.workspace_id, data.tools)
    values = _fields(data)
    for key, value in values.items():
        # null means "clear" only where a column can be empty (temperature: the
        # model's default); elsewhere it is refused rather than half-applied.
        if value is None and key != "temperature":
            raise ValidationFailed(f"{key} cannot be null", field=key)
        setattr(agent, key, value)
    await uow.session.flush()
    record(
        uow.session,
        access.principal,
        workspace_id=agent.workspace_id,
        action="agent.update",
        resource_type="agent",
        resource_id=agent.id,
        details={"fields": sorted(values)},
    )
    return agent


async def delete(uow: UnitOfWork, access: WorkspaceAccess) -> None:
    agent: Agent = access.resource
    callers = await uow.session.scalars(
        select(Agent.name).where(
            Agent.workspace_id == agent.workspace_id, Agent.sub_agents.contains([str(agent.id)])
        )
    )
    names = sorted(callers.all())
    if names:
        raise Conflict(f"other agents call this one: {', '.join(names)}", agents=names)
    flows = await workflows_using(uow.session, agent.workspace_id, "agent_id", agent.id)
    if flows:
        raise Conflict(f"workflows use this agent: {', '.join(flows)}", workflows=flows)
    record(
        uow.session,
        access.principal,
        workspace_id=agent.workspace_id,
        action="agent.delete",
        resource_type="agent",
        resource_id=agent.id,
        details={"name": agent.name},
    )
    await uow.session.delete(agent)
    await uow.session.flush()


def _tool_name(agent: Agent) -> str:
    # The id's head keeps two similarly named sub-agents apart.
    base = re.sub(r"[^a-zA-Z0-9_-]+", "_", agent.name).strip("_")[:48]
    return f"agent_{base}_{agent.id.hex[:6]}"


async def build_spec(
    session: AsyncSession,
    client: anthropic.AsyncAnthropic,
    agent: Agent,
    *,
    max_iterations: int,
    budget: runtime.Budget,
    spent: runtime.AgentResult,
    depth: int = 0,
    built: dict[tuple[uuid.UUID, int], runtime.AgentSpec] | None = None,
    http: httpx.AsyncClient | None = None,
    settings: Settings | None = None,
) -> runtime.AgentSpec:
    """The runtime spec of an agent: its built-in tools and its sub-agents as tools.
    Sub-agent calls share the run's `budget` and add their usage and cost to `spent`.
    `http_request`, `web_read` and `web_search` need the guarded `http` client (and
    settings) to be offered."""
    built = {} if built is None else built
    if (agent.id, depth) in built:
        return built[(agent.id, depth)]
    tools: list[runtime.Tool] = []
    for t in agent.tools:
        if t.get("type") == "mcp" and settings is not None:
            tools += await mcp_runtime.agent_tools(session, settings, agent.workspace_id, t)
            continue
        if t.get("type") != "builtin":
            continue
        if t.get("name") == "http_request" and http is not None and settings is not None:
            tools.append(runtime.http_tool(http, settings))
        elif t.get("name") in web.AGENT_TOOLS and http is not None and settings is not None:
            tools.append(web.agent_tool(t["name"], http, settings))
        elif t.get("name") in runtime.BUILTINS:
            tools.append(runtime.BUILTINS[t["name"]])
    if depth < MAX_SUB_AGENT_DEPTH and agent.sub_agents:
        subs = await session.scalars(
            select(Agent).where(
                Agent.workspace_id == agent.workspace_id,
                Agent.id.in_([uuid.UUID(s) for s in agent.sub_agents]),
            )
        )
        for sub in subs.all():
            sub_spec = await build_spec(
                session, client, sub, max_iterations=max_iterations, budget=budget,
                spent=spent, depth=depth + 1, built=built, http=http, settings=settings,
            )  # fmt: skip

            async def call_sub(
                args: dict[str, Any], spec: runtime.AgentSpec = sub_spec
            ) -> dict[str, Any]:
                part = runtime.AgentResult(
                    output="", stop_reason="", iterations=0, model=spec.model
                )
                try:
                    await runtime.run(
                        client, spec, str(args.get("task", "")), budget=budget, result=part
                    )
                finally:
                    _merge(spent, part)
                return {"output": part.output, "stop_reason": part.stop_reason}

            tools.append(
                runtime.Tool(
                    name=_tool_name(sub),
                    description=(sub.description or f"Ask the {sub.name} agent")[:1000],
                    input_schema={
                        "type": "object",
                        "properties": {"task": {"type": "string"}},
                        "required": ["task"],
                    },
                    handler=call_sub,
                )
            )
    spec = runtime.AgentSpec(
        model=agent.model,
        system_prompt=agent.system_prompt,
        max_tokens=agent.max_tokens,
        temperature=agent.temperature,
        tools=tools,
        max_iterations=max_iterations,
    )
    built[(agent.id, depth)] = spec
    return spec


def _merge(into: runtime.AgentResult, part: runtime.AgentResult) -> None:
    for key, value in asdict(part.usage).items():
        setattr(into.usage, key, getattr(into.usage, key) + value)
    into.cost = None if into.cost is None or part.cost is None else into.cost + part.cost


async def test(
    uow: UnitOfWork, settings: Settings, access: WorkspaceAccess, data: AgentTest
) -> AgentTestResult:
    agent: Agent = access.resource
    timeout = settings.anthropic.test_timeout_s
    client = await runtime.client_for(settings, timeout_s=timeout)
    budget = runtime.Budget(
        max_calls=settings.anthropic.max_calls_per_run, prices=settings.anthropic.prices
    )
    subs = runtime.AgentResult(output="", stop_reason="", iterations=0, model=agent.model)
    result = runtime.AgentResult(output="", stop_reason="", iterations=0, model=agent.model)
    http = guarded_client(settings.http.allow_private_networks, user_agent=settings.http.user_agent)
    try:
        spec = await build_spec(
            uow.session,
            client,
            agent,
            max_iterations=data.max_iterations,
            budget=budget,
            spent=subs,
            http=http,
            settings=settings,
        )
        async with asyncio.timeout(timeout):
            await runtime.run(client, spec, data.input, budget=budget, result=result)
    except TimeoutError as exc:
        raise DependencyUnavailable(f"the agent did not finish within {timeout:.0f} s") from exc
    except runtime.BudgetExceeded as exc:
        raise QuotaExceeded(str(exc)) from exc
    except anthropic.RateLimitError as exc:
        retry = exc.response.headers.get("retry-after")
        raise RateLimited(
            "the model provider is rate limiting; try again shortly",
            retry_after_s=_retry_after_s(retry),
        ) from exc
    except (anthropic.APIConnectionError, anthropic.InternalServerError) as exc:
        raise DependencyUnavailable(
            f"the model provider is unreachable or overloaded: {type(exc).__name__}"
        ) from exc
    except anthropic.AuthenticationError as exc:
        raise UpstreamError(
            "the model provider refused the API key (ANTHROPIC__API_KEY)",
            field="ANTHROPIC__API_KEY",
        ) from exc
    except anthropic.APIStatusError as exc:
        raise UpstreamError(
            f"the model provider answered {exc.status_code}: {exc.message}"
        ) from exc
    except anthropic.APIError as exc:
        raise UpstreamError(
            f"the model provider's answer was unusable: {type(exc).__name__}"
        ) from exc
    finally:
        await client.close()
        await http.aclose()
    _merge(result, subs)
    record(
        uow.session,
        access.principal,
        workspace_id=agent.workspace_id,
        action="agent.test",
        resource_type="agent",
        resource_id=agent.id,
        details={
            "iterations": result.iterations,
            "input_tokens": result.usage.input_tokens,
            "output_tokens": result.usage.output_tokens,
            "stop_reason": result.stop_reason,
        },
    )
    return AgentTestResult.model_validate(
        {
            "output": result.output,
            "stop_reason": result.stop_reason,
            "iterations": result.iterations,
            "model": result.model,
            "tool_calls": [asdict(c) for c in result.tool_calls],
            "usage": asdict(result.usage),
            "cost_usd": result.cost_usd,
            "duration_ms": result.duration_ms,
        }
    )


def _retry_after_s(value: str | None, default: int = 30) -> int:
    """The provider's Retry-After in whole seconds (1 s to an hour); anything that is
    not a finite number of seconds ("1.2.3", "inf", a date) gives the default."""
    try:
        seconds = float(value) if value else float(default)
    except ValueError:
        return default
    if not math.isfinite(seconds):
        return default
    return int(min(max(seconds, 1.0), 3600.0))
