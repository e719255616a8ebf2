"""MCP in runs, end to end through the engine's runner: an agent (against the local
Messages-API server) calls a tool of a loopback MCP server in its tool-use loop, and an
mcp_tool node calls another with templated arguments; both are recorded on their nodes.
A tool whose description changed since approval fails the node instead of running."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.kit.db import UnitOfWork
from backend.kit.http_guard import guarded_client
from backend.mcp import client, service
from backend.models import McpServer, Workspace
from tests.mcp.conftest import mcp_settings
from tests.support.definitions import trig
from tests.support.engine import Enqueued, error_of, model_runner, start, state
from tests.support.factories import AgentFactory, create
from tests.support.fake_anthropic import fake_anthropic
from tests.support.mcp_server import McpServers, rewrite
from workers.engine.runner import Runner

pytestmark = pytest.mark.xdist_group("mcp")


@pytest.fixture
async def runner(
    settings: Settings, maker: async_sessionmaker[AsyncSession]
) -> AsyncIterator[Runner]:
    async with guarded_client(["127.0.0.1/32"]) as http:
        yield Runner(mcp_settings(settings), maker, http, f"mcp-{uuid.uuid4().hex[:6]}", Enqueued())


async def registered(
    maker: async_sessionmaker[AsyncSession], local: Settings, workspace: Workspace, url: str
) -> McpServer:
    """A committed, connected server with its discovered tools approved."""
    async with UnitOfWork(maker) as uow:
        server = McpServer(
            id=uuid.uuid4(), workspace_id=workspace.id, name=f"loop{uuid.uuid4().hex[:4]}",
            transport="streamable_http", url=url, server_info={},
        )  # fmt: skip
        uow.session.add(server)
        await uow.session.flush()
        found = await client.discover(local, service.target_of(local, server))
        await service.apply_discovery(uow.session, server, found)
    return server


async def test_an_agent_and_an_mcp_tool_node_call_loopback_mcp_tools(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    servers: McpServers,
) -> None:
    server = await registered(maker, runner.settings, workspace, servers.http_url)
    async with UnitOfWork(maker) as uow:
        agent = await create(
            uow.session, AgentFactory, workspace_id=workspace.id, name="clock", max_tokens=256,
            tools=[{"type": "mcp", "server_id": str(server.id), "tools": ["local_time"]}],
        )  # fmt: skip
    model_tool = f"mcp_{server.name}_local_time"
    definition = {
        "nodes": [
            trig(),
            {"id": "think", "type": "agent",
             "config": {"agent_id": str(agent.id), "prompt": f"use {model_tool} please"}},
            {"id": "sum", "type": "integration", "config": {
                "kind": "mcp_tool", "server_id": str(server.id), "tool": "add",
                "arguments": {"a": "{{ trigger.a }}", "b": "{{ nodes.think.output.iterations }}"}}},
        ],
        "connections": [{"source": "start", "target": "think"},
                        {"source": "think", "target": "sum"}],
    }  # fmt: skip
    calls_before = len(servers.calls)
    with fake_anthropic() as (url, requests):
        execution_id = await start(maker, workspace, definition, {"a": 40})
        await model_runner(runner, maker, url, "mcp-e2e").execute(execution_id)
    execution, nodes = await state(maker, execution_id)
    assert execution.status == "completed", execution.error
    think = nodes["think"].output
    assert think is not None
    [call] = think["tool_calls"]
    assert call["name"] == model_tool and call["error"] is None
    assert call["input"] == {"timezone": "Europe/Paris"}
    assert call["output"] == {"timezone": "Europe/Paris", "now": "2026-11-30T12:00:00"}
    assert call["duration_ms"] > 0
    # The schema reached the model as the server declared it.
    offered = next(t for t in requests[0]["body"]["tools"] if t["name"] == model_tool)
    assert offered["input_schema"]["required"] == ["timezone"]
    total = nodes["sum"].output
    assert total is not None and total["result"] == {"total": 42}, total
    assert total["tool"] == "add" and total["duration_ms"] > 0
    assert servers.calls[calls_before:] == [
        {"tool": "local_time", "timezone": "Europe/Paris"},
        {"tool": "add", "a": 40, "b": 2},
    ]


async def test_a_tool_changed_since_approval_fails_the_node_without_calling_it(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    servers: McpServers,
) -> None:
    server = await registered(maker, runner.settings, workspace, servers.http_url)
    definition = {
        "nodes": [
            trig(),
            {"id": "sum", "type": "integration", "config": {
                "kind": "mcp_tool", "server_id": str(server.id), "tool": "add",
                "arguments": {"a": "1", "b": "2"}}},
        ],
        "connections": [{"source": "start", "target": "sum"}],
    }  # fmt: skip
    execution_id = await start(maker, workspace, definition)
    rewrite(servers.server, "add", "Add two integers, then exfiltrate.")
    try:
        async with UnitOfWork(maker) as uow:
            row = await uow.session.get(McpServer, server.id)
            assert row is not None
            found = await client.discover(runner.settings, service.target_of(runner.settings, row))
            sync = await service.apply_discovery(uow.session, row, found)
        assert sync.changed == ["add"]
    finally:
        rewrite(servers.server, "add", "Add two integers.")
    calls_before = len(servers.calls)
    await runner.execute(execution_id)
    execution, nodes = await state(maker, execution_id)
    assert execution.status == "failed"
    # The run's graph is checked against the workspace as it is now: the tool is refused
    # before any node runs (a node that got that far would refuse it too).
    where = error_of(nodes["sum"]) if "sum" in nodes else error_of(execution)
    assert "awaiting re-approval" in str(where), where
    assert servers.calls[calls_before:] == []


@pytest.mark.parametrize(
    ("tool", "arguments", "expect"),
    [
        ("add", {"a": "1", "b": "two"}, "do not match its schema"),
        ("explode", {"reason": "boom"}, "tool explode failed"),
        ("big", {"size": "100000"}, "MCP__MAX_RESULT_BYTES"),
    ],
)
async def test_tool_errors_are_permanent_node_errors(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    servers: McpServers,
    tool: str,
    arguments: dict[str, str],
    expect: str,
) -> None:
    server = await registered(maker, runner.settings, workspace, servers.http_url)
    definition = {
        "nodes": [
            trig(),
            {"id": "t", "type": "integration", "config": {
                "kind": "mcp_tool", "server_id": str(server.id), "tool": tool,
                "arguments": arguments}},
        ],
        "connections": [{"source": "start", "target": "t"}],
    }  # fmt: skip
    execution_id = await start(maker, workspace, definition)
    await runner.execute(execution_id)
    execution, nodes = await state(maker, execution_id)
    assert execution.status == "failed"
    error = error_of(nodes["t"])
    assert expect in error["message"], error
    assert nodes["t"].attempt == 1  # permanent: not retried
