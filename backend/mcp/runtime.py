"""MCP tools in runs: what the mcp_tool node and agents call. Each call re-reads the
server and its approved tools (a tool marked `changed` since the workflow was saved is
refused), validates the arguments against the stored input schema, and calls through
the guarded client."""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable
from typing import Any

import jsonschema
from sqlalchemy.ext.asyncio import AsyncSession

from backend.agents import runtime as agents
from backend.config import Settings
from backend.mcp import client, service
from backend.models import McpServer, McpTool


class ArgumentsInvalid(Exception):
    pass


def check_arguments(tool: McpTool, arguments: dict[str, Any]) -> None:
    try:
        validator_cls = jsonschema.validators.validator_for(tool.input_schema)
        validator_cls.check_schema(tool.input_schema)
    except jsonschema.SchemaError:
        # A schema the server sent that is not valid JSON Schema cannot be enforced here;
        # the server checks its own arguments.
        return
    errors = sorted(validator_cls(tool.input_schema).iter_errors(arguments), key=str)
    if errors:
        first = errors[0]
        where = ".".join(str(p) for p in first.absolute_path) or "(arguments)"
        raise ArgumentsInvalid(
            f"arguments of {tool.name} do not match its schema at {where}: {first.message}"
        )


async def resolve(
    session: AsyncSession, workspace_id: uuid.UUID, server_id: uuid.UUID, tool_name: str
) -> tuple[McpServer, McpTool]:
    server, tools = await service.offered(session, workspace_id, server_id)
    tool = tools.get(tool_name)
    if tool is None:
        raise service.Unavailable(
            f"tool {tool_name!r} of MCP server {server.name!r} is not offered "
            "(unknown, removed, or changed and awaiting re-approval)"
        )
    return server, tool


async def call(
    settings: Settings, server: McpServer, tool: McpTool, arguments: dict[str, Any]
) -> dict[str, Any]:
    check_arguments(tool, arguments)
    return await client.call(settings, service.target_of(settings, server), tool.name, arguments)


def tool_name(server: McpServer, tool: str) -> str:
    """The name the model sees: `mcp_<server>_<tool>`, within the API's 64 characters
    of [a-zA-Z0-9_-], so tools of two servers never clash."""
    prefix = re.sub(r"[^a-zA-Z0-9_-]+", "_", server.name).strip("_")[:20] or "server"
    return f"mcp_{prefix}_{re.sub(r'[^a-zA-Z0-9_-]+', '_', tool)}"[:64]


async def agent_tools(
    session: AsyncSession, settings: Settings, workspace_id: uuid.UUID, entry: dict[str, Any]
) -> list[agents.Tool]:
    """An agent's `{"type": "mcp", "server_id", "tools": [...]}` as runtime tools: the
    listed approved tools (all approved tools when the list is empty), each with its
    schema exactly as the server declared it. A server that is not usable now offers
    nothing rather than failing the whole agent."""
    try:
        server, offered = await service.offered(
            session, workspace_id, uuid.UUID(str(entry.get("server_id")))
        )
    except (service.Unavailable, ValueError):
        return []
    wanted = entry.get("tools") or sorted(offered)
    out = []
    for name in wanted:
        tool = offered.get(name)
        if tool is None:
            continue

        def handler(
            args: dict[str, Any], server: McpServer = server, tool: McpTool = tool
        ) -> Awaitable[Any]:
            return _agent_call(settings, server, tool, args)

        out.append(
            agents.Tool(
                name=tool_name(server, tool.name),
                description=tool.description or f"{tool.name} (MCP server {server.name})",
                input_schema=tool.input_schema or {"type": "object"},
                handler=handler,
            )
        )
    return out


async def _agent_call(
    settings: Settings, server: McpServer, tool: McpTool, args: dict[str, Any]
) -> Any:
    # Errors go back to the model as tool errors (the runtime catches them).
    answer = await call(settings, server, tool, args)
    return answer["structured"] if answer["structured"] is not None else answer["text"]
