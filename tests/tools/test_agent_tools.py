"""web_read and web_search as built-in agent tools: offered to the model with their
schemas, run by a real agent node (and by the agent test endpoint) against the local
Messages-API server, each call's input and result kept on the node; a refused address
or a missing provider is a tool error the model sees, not a silent skip."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.kit.db import UnitOfWork
from backend.kit.http_guard import guarded_client
from backend.models import Workspace
from tests.support.definitions import trig
from tests.support.engine import Enqueued, start, state
from tests.support.factories import AgentFactory, create
from tests.support.identity import Actor
from tests.tools.conftest import Requests, configure
from tests.tools.sites import Sites
from workers.engine.runner import Runner

WEB_TOOLS = [{"type": "builtin", "name": "web_read"}, {"type": "builtin", "name": "web_search"}]


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with guarded_client(["127.0.0.1/32"]) as client:
        yield client


def runner_for(
    settings: Settings, maker: async_sessionmaker[AsyncSession], http: httpx.AsyncClient
) -> Runner:
    return Runner(settings, maker, http, f"tools-{uuid.uuid4().hex[:6]}", Enqueued())


async def run_agent(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace, prompt: str
) -> dict[str, Any]:
    async with UnitOfWork(maker) as uow:
        agent = await create(
            uow.session,
            AgentFactory,
            workspace_id=workspace.id,
            name=f"reader-{uuid.uuid4().hex[:6]}",
            max_tokens=512,
            tools=WEB_TOOLS,
        )
    definition = {
        "nodes": [
            trig(),
            {
                "id": "think",
                "type": "agent",
                "config": {"agent_id": str(agent.id), "prompt": prompt},
            },
        ],
        "connections": [{"source": "start", "target": "think"}],
    }
    execution_id = await start(maker, workspace, definition)
    assert await runner.execute(execution_id) == "completed"
    _, rows = await state(maker, execution_id)
    output: dict[str, Any] = rows["think"].output
    return output


async def test_an_agent_reads_a_page_with_web_read(
    local: Settings,
    maker: async_sessionmaker[AsyncSession],
    http: httpx.AsyncClient,
    workspace: Workspace,
    sites: Sites,
    anthropic_server: tuple[str, Requests],
) -> None:
    _, requests = anthropic_server
    before = len(requests)
    output = await run_agent(
        runner_for(local, maker, http), maker, workspace, f"use web_read on {sites.base}/article"
    )
    offered = {t["name"]: t for t in requests[before]["body"]["tools"]}
    assert set(offered) == {"web_read", "web_search"}
    assert offered["web_read"]["input_schema"]["required"] == ["url"]
    (call,) = output["tool_calls"]
    assert call["name"] == "web_read" and call["input"] == {"url": f"{sites.base}/article"}
    assert call["error"] is None and call["output"]["title"] == "The Article Title"
    assert "Workflows are graphs of nodes." in call["output"]["text"]
    # The model got the page back and answered from it.
    assert "The Article Title" in output["text"]


async def test_an_agent_searches_with_web_search(
    local: Settings,
    maker: async_sessionmaker[AsyncSession],
    http: httpx.AsyncClient,
    workspace: Workspace,
) -> None:
    output = await run_agent(
        runner_for(local, maker, http), maker, workspace, "use web_search for durable runs"
    )
    (call,) = output["tool_calls"]
    assert call["name"] == "web_search" and call["input"] == {"query": "durable runs"}
    results = call["output"]["results"]
    assert len(results) == 5 and results[0]["url"] == "https://r0.example/durable-runs"
    assert "r0.example" in output["text"]


@pytest.mark.parametrize(
    ("prompt", "tools", "expect"),
    [
        ("use web_read on http://169.254.169.254/latest/meta-data/", {}, "refused"),
        ("use web_search for anything", {"search_provider": None}, "TOOLS__SEARCH_PROVIDER"),
    ],
)
async def test_refusals_reach_the_model_as_tool_errors(
    local: Settings,
    maker: async_sessionmaker[AsyncSession],
    http: httpx.AsyncClient,
    workspace: Workspace,
    prompt: str,
    tools: dict[str, Any],
    expect: str,
) -> None:
    output = await run_agent(
        runner_for(configure(local, **tools), maker, http), maker, workspace, prompt
    )
    (call,) = output["tool_calls"]
    assert call["output"] is None and expect in (call["error"] or "")
    assert expect in output["text"]


async def test_the_agent_test_endpoint_offers_the_web_tools_too(
    api: httpx.AsyncClient, editor: Actor, sites: Sites
) -> None:
    r = await api.post(
        "/api/v1/agents", headers=editor.headers, json={"name": "Reader", "tools": WEB_TOOLS}
    )
    assert r.status_code == 201, r.text
    r = await api.post(
        f"/api/v1/agents/{r.json()['id']}/test",
        headers=editor.headers,
        json={"input": f"use web_read on {sites.base}/plain"},
    )
    assert r.status_code == 200, r.text
    (call,) = r.json()["tool_calls"]
    assert call["name"] == "web_read" and call["output"]["text"].startswith("just text")
