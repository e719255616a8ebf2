"""The agent's built-in http_request tool, run by a real agent node against the local
Messages-API server: it fetches a public (here: allow-listed loopback) URL for the model,
and the SSRF guard refuses a metadata address, which the model sees as a tool error."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.kit.db import UnitOfWork
from backend.models import Workspace
from tests.support.definitions import trig
from tests.support.engine import model_runner, start, state
from tests.support.factories import AgentFactory, create
from tests.support.fake_anthropic import fake_anthropic
from tests.support.target import Target
from workers.engine.runner import Runner

pytestmark = pytest.mark.xdist_group("engine")


async def agent_with_http(maker: async_sessionmaker[AsyncSession], workspace: Workspace) -> str:
    async with UnitOfWork(maker) as uow:
        agent = await create(
            uow.session,
            AgentFactory,
            workspace_id=workspace.id,
            name="fetcher",
            max_tokens=512,
            tools=[{"type": "builtin", "name": "http_request"}],
        )
    return str(agent.id)


@pytest.mark.parametrize(
    ("where", "expect"),
    [("allowed", '"status": 200'), ("metadata", "blocked")],
)
async def test_the_http_request_tool_goes_through_the_guard(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    target: Target,
    where: str,
    expect: str,
) -> None:
    url = f"{target.base}/ok?n=agent-tool" if where == "allowed" else "http://169.254.169.254/"
    agent_id = await agent_with_http(maker, workspace)
    definition = {
        "nodes": [
            trig(),
            {
                "id": "think",
                "type": "agent",
                "config": {"agent_id": agent_id, "prompt": f"use http_request on {url}"},
            },
        ],
        "connections": [{"source": "start", "target": "think"}],
    }
    hits = target.query_hits["agent-tool"]
    with fake_anthropic() as (api, requests):
        execution_id = await start(maker, workspace, definition)
        assert await model_runner(runner, maker, api, "tools").execute(execution_id) == "completed"
    offered = {t["name"] for t in requests[0]["body"]["tools"]}
    assert offered == {"http_request"}
    _, rows = await state(maker, execution_id)
    output = rows["think"].output
    (call,) = output["tool_calls"]
    assert call["name"] == "http_request"
    assert expect in output["text"].lower() or expect in str(call).lower()
    if where == "allowed":
        assert call["output"]["status"] == 200
        assert target.query_hits["agent-tool"] == hits + 1
    else:
        assert call["error"] and "blocked" in call["error"].lower()
