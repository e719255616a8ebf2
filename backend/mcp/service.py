"""MCP servers of a workspace: CRUD with sealed secrets, connect (handshake + tool
discovery, stored with hashes), disconnect, and approval of changed tools.

A tool is offered to agents and mcp_tool nodes only while `approved`: on rediscovery, a
description or input schema that differs from what was approved marks it `changed`
(tool poisoning / rug pulls: a server that changes what a tool says it does must not
change it under running workflows unseen), until someone with workflows.write approves
it again."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.activity.service import record
from backend.auth.dependencies import WorkspaceAccess
from backend.config import Settings
from backend.kit.crypto import SecretBox
from backend.kit.db import UnitOfWork
from backend.kit.errors import Conflict, NotFound, ValidationFailed
from backend.kit.repository import Repository
from backend.mcp import client
from backend.mcp.schemas import (
    ApproveTools,
    McpServerCreate,
    McpServerPatch,
    McpServerPut,
    shape_problem,
)
from backend.models import McpServer, McpTool
from backend.workflows.service import workflows_using


class ServerRepository(Repository[McpServer]):
    model = McpServer


class ToolRepository(Repository[McpTool]):
    model = McpTool


# Secrets ----------------------------------------------------------------------------------


def _plain(values: dict[str, SecretStr] | None) -> dict[str, str]:
    return {k: v.get_secret_value() for k, v in (values or {}).items()}


def _seal(
    settings: Settings, server: McpServer, headers: dict[str, str], env: dict[str, str]
) -> None:
    # Bound to the row like credentials: a ciphertext pasted into another row won't open.
    payload = {
        "id": str(server.id),
        "workspace_id": str(server.workspace_id),
        "headers": headers,
        "env": env,
    }
    server.secrets_encrypted = SecretBox(settings).seal(json.dumps(payload))
    server.header_names = sorted(headers)
    server.env_names = sorted(env)


def secrets_of(settings: Settings, server: McpServer) -> tuple[dict[str, str], dict[str, str]]:
    """(headers, env) of a server; for connecting only, never for a response."""
    if not server.secrets_encrypted:
        return {}, {}
    payload = json.loads(SecretBox(settings).open(server.secrets_encrypted))
    if payload.get("id") != str(server.id) or payload.get("workspace_id") != str(
        server.workspace_id
    ):
        raise ValueError("MCP server secrets do not belong to this row")
    return dict(payload.get("headers") or {}), dict(payload.get("env") or {})


def target_of(settings: Settings, server: McpServer) -> client.Target:
    headers, env = secrets_of(settings, server)
    return client.Target(
        transport=server.transport,
        url=server.url,
        command=server.command,
        headers=headers,
        env=env,
        timeout_s=server.timeout_s,
    )


def _check_stdio(
    settings: Settings, transport: str, command: str | None, env: dict[str, str]
) -> None:
    """A tenant never supplies a command line: stdio names an operator-listed server,
    and only the env names the operator allowed for it."""
    if transport != "stdio":
        return
    listed = settings.mcp.stdio_servers.get(command or "")
    if listed is None:
        names = ", ".join(sorted(settings.mcp.stdio_servers)) or "none"
        raise ValidationFailed(
            f"stdio servers run only commands an operator listed (MCP__STDIO_SERVERS); "
            f"{command!r} is not one of them (listed: {names})",
            field="command",
        )
    extra = sorted(set(env) - set(listed.env_keys))
    if extra:
        raise ValidationFailed(
            f"env {extra[0]!r} is not one the operator allows for {command!r} "
            f"(allowed: {', '.join(listed.env_keys) or 'none'})",
            field=f"env.{extra[0]}",
        )


async def _name_free(
    session: AsyncSession, workspace_id: uuid.UUID, name: str, me: uuid.UUID | None
) -> None:
    clash = await session.scalar(
        select(McpServer.id).where(McpServer.workspace_id == workspace_id, McpServer.name == name)
    )
    if clash is not None and clash != me:
        raise Conflict(f"an MCP server named {name!r} exists", field="name")


# CRUD -------------------------------------------------------------------------------------


async def create(
    uow: UnitOfWork, settings: Settings, access: WorkspaceAccess, data: McpServerCreate
) -> McpServer:
    env = _plain(data.env)
    problem = shape_problem(
        data.transport,
        url=data.url,
        command=data.command,
        env=bool(env),
        headers=bool(data.headers),
    )
    if problem:
        field, _, message = problem.partition(": ")
        raise ValidationFailed(message, field=field)
    _check_stdio(settings, data.transport, data.command, env)
    await _name_free(uow.session, access.workspace.id, data.name, None)
    server = McpServer(
        id=uuid.uuid4(),
        workspace_id=access.workspace.id,
        name=data.name,
        description=data.description,
        transport=data.transport,
        url=data.url,
        command=data.command,
        timeout_s=data.timeout_s,
        status="disconnected",
        server_info={},
        created_by=access.user.id,
    )
    _seal(settings, server, _plain(data.headers), env)
    uow.session.add(server)
    await uow.session.flush()
    record(
        uow.session,
        access.principal,
        workspace_id=access.workspace.id,
        action="mcp_server.create",
        resource_type="mcp_server",
        resource_id=server.id,
        details={"name": server.name, "transport": server.transport},
    )
    return server


async def list_servers(
    uow: UnitOfWork, access: WorkspaceAccess, *, limit: int, offset: int
) -> tuple[Sequence[McpServer], int]:
    stmt = (
        select(McpServer)
        .where(McpServer.workspace_id == access.workspace.id)
        .order_by(McpServer.name, McpServer.id)
    )
    return await ServerRepository(uow.session).paginate(stmt, limit=limit, offset=offset)


async def update(
    uow: UnitOfWork,
    settings: Settings,
    access: WorkspaceAccess,
    data: McpServerPut | McpServerPatch,
) -> McpServer:
    server: McpServer = access.resource
    given = data.model_dump(exclude_unset=True)
    if isinstance(data, McpServerPut):
        # A replace: fields left out go back to their defaults, secrets excepted.
        for name in ("description", "url", "command", "timeout_s"):
            given.setdefault(name, getattr(data, name))
    headers, env = secrets_of(settings, server)
    if data.headers is not None:
        headers = _plain(data.headers)
    if data.env is not None:
        env = _plain(data.env)
    transport = given.get("transport", server.transport)
    url = given.get("url", server.url)
    command = given.get("command", server.command)
    if transport != "stdio":
        command, env = None, {}
    else:
        url, headers = None, {}
    problem = shape_problem(transport, url=url, command=command, env=bool(env), headers=False)
    if problem:
        field, _, message = problem.partition(": ")
        raise ValidationFailed(message, field=field)
    _check_stdio(settings, transport, command, env)
    if "name" in given and given["name"] != server.name:
        await _name_free(uow.session, server.workspace_id, given["name"], server.id)
        server.name = given["name"]
    connection_changed = (transport, url, command) != (server.transport, server.url, server.command)
    server.transport, server.url, server.command = transport, url, command
    if "description" in given and given["description"] is not None:
        server.description = given["description"]
    if "timeout_s" in given:
        server.timeout_s = given["timeout_s"]
    _seal(settings, server, headers, env)
    if connection_changed:
        # Another endpoint is another server: connect again to see what it offers.
        server.status, server.status_reason = "disconnected", "settings changed; connect again"
    await uow.session.flush()
    record(
        uow.session,
        access.principal,
        workspace_id=server.workspace_id,
        action="mcp_server.update",
        resource_type="mcp_server",
        resource_id=server.id,
        details={"fields": sorted(k for k in given if k not in ("headers", "env"))
                 + (["headers"] if data.headers is not None else [])
                 + (["env"] if data.env is not None else [])},
    )  # fmt: skip
    return server


async def delete(uow: UnitOfWork, access: WorkspaceAccess) -> None:
    server: McpServer = access.resource
    users = await workflows_using(
        uow.session, server.workspace_id, "server_id", server.id, published_only=True
    )
    if users:
        raise Conflict(
            f"published workflows use this MCP server: {', '.join(users)}", workflows=users
        )
    record(
        uow.session,
        access.principal,
        workspace_id=server.workspace_id,
        action="mcp_server.delete",
        resource_type="mcp_server",
        resource_id=server.id,
        details={"name": server.name},
    )
    await uow.session.delete(server)
    await uow.session.flush()


# Connect and discovery --------------------------------------------------------------------


@dataclass
class Sync:
    tools: list[McpTool]
    added: list[str]
    changed: list[str]
    removed: list[str]


async def tools_of(session: AsyncSession, server_id: uuid.UUID) -> list[McpTool]:
    rows = await session.scalars(
        select(McpTool).where(McpTool.server_id == server_id).order_by(McpTool.name)
    )
    return list(rows.all())


async def apply_discovery(
    session: AsyncSession, server: McpServer, found: client.Discovery
) -> Sync:
    """Store what the server lists: new tools are approved as first seen (someone just
    chose to connect this server); a known tool whose hash moved off its approved hash
    becomes `changed`; tools no longer listed become `removed`."""
    now = datetime.now(UTC)
    existing = {t.name: t for t in await tools_of(session, server.id)}
    sync = Sync(tools=[], added=[], changed=[], removed=[])
    seen: set[str] = set()
    for tool in found.tools:
        if tool.name in seen:
            continue
        seen.add(tool.name)
        row = existing.get(tool.name)
        digest = tool.hash
        if row is None:
            row = McpTool(
                server_id=server.id,
                workspace_id=server.workspace_id,
                name=tool.name,
                description=tool.description,
                input_schema=tool.input_schema,
                hash=digest,
                approved_hash=digest,
                status="approved",
                approved_at=now,
                last_seen_at=now,
            )
            session.add(row)
            sync.added.append(tool.name)
        else:
            if row.status == "approved" and digest != row.approved_hash:
                row.previous = {"description": row.description, "input_schema": row.input_schema}
            row.description, row.input_schema, row.hash = (
                tool.description,
                tool.input_schema,
                digest,
            )
            row.last_seen_at = now
            if digest == row.approved_hash:
                row.status = "approved"
            else:
                row.status = "changed"
                sync.changed.append(tool.name)
        sync.tools.append(row)
    for name, row in existing.items():
        if name not in seen:
            row.status = "removed"
            sync.removed.append(name)
            sync.tools.append(row)
    server.status, server.status_reason = "connected", None
    server.last_connected_at = now
    server.server_info = found.server_info
    await session.flush()
    sync.tools.sort(key=lambda t: t.name)
    return sync


async def connect(
    uow: UnitOfWork, settings: Settings, access: WorkspaceAccess
) -> tuple[McpServer, Sync]:
    server: McpServer = access.resource
    try:
        found = await client.discover(settings, target_of(settings, server))
    except client.McpFailure as exc:
        server.status, server.status_reason = "error", str(exc)[:2000]
        await uow.session.flush()
        record(
            uow.session,
            access.principal,
            workspace_id=server.workspace_id,
            action="mcp_server.connect_failed",
            resource_type="mcp_server",
            resource_id=server.id,
            details={"reason": server.status_reason},
        )
        tools = await tools_of(uow.session, server.id)
        return server, Sync(tools=tools, added=[], changed=[], removed=[])
    sync = await apply_discovery(uow.session, server, found)
    record(
        uow.session,
        access.principal,
        workspace_id=server.workspace_id,
        action="mcp_server.connect",
        resource_type="mcp_server",
        resource_id=server.id,
        details={"tools": len(found.tools), "changed": sync.changed},
    )
    return server, sync


async def disconnect(uow: UnitOfWork, access: WorkspaceAccess) -> McpServer:
    """Takes the server out of use: its tools are not offered, its nodes fail clearly,
    until it is connected again."""
    server: McpServer = access.resource
    server.status, server.status_reason = "disconnected", None
    await uow.session.flush()
    record(
        uow.session,
        access.principal,
        workspace_id=server.workspace_id,
        action="mcp_server.disconnect",
        resource_type="mcp_server",
        resource_id=server.id,
    )
    return server


async def approve(uow: UnitOfWork, access: WorkspaceAccess, data: ApproveTools) -> list[McpTool]:
    server: McpServer = access.resource
    tools = await tools_of(uow.session, server.id)
    by_name = {t.name: t for t in tools}
    missing = [n for n in data.tools if n not in by_name]
    if missing:
        raise NotFound(f"no tool {missing[0]!r} on this server", field="tools")
    chosen = tools if data.all else [by_name[n] for n in data.tools]
    now = datetime.now(UTC)
    approved = []
    for tool in chosen:
        if tool.status == "removed":
            if not data.all:
                raise ValidationFailed(
                    f"tool {tool.name!r} is no longer listed by the server", field="tools"
                )
            continue
        tool.approved_hash, tool.status = tool.hash, "approved"
        tool.previous = None
        tool.approved_by, tool.approved_at = access.user.id, now
        approved.append(tool.name)
    await uow.session.flush()
    record(
        uow.session,
        access.principal,
        workspace_id=server.workspace_id,
        action="mcp_tool.approve",
        resource_type="mcp_server",
        resource_id=server.id,
        details={"tools": approved},
    )
    return tools


# What runs may use ------------------------------------------------------------------------


class Unavailable(Exception):
    """A server or tool a run asked for that it may not use now (message says why)."""


async def offered(
    session: AsyncSession, workspace_id: uuid.UUID, server_id: uuid.UUID
) -> tuple[McpServer, dict[str, McpTool]]:
    """A connected server of the workspace and its approved tools, by name."""
    server = await session.get(McpServer, server_id)
    if server is None or server.workspace_id != workspace_id:
        raise Unavailable(f"MCP server {server_id} not found in this workspace")
    if server.status == "disconnected":
        raise Unavailable(f"MCP server {server.name!r} is disconnected; connect it first")
    tools = {t.name: t for t in await tools_of(session, server.id) if t.status == "approved"}
    return server, tools


async def validation_tools(
    session: AsyncSession, workspace_id: uuid.UUID
) -> tuple[frozenset[uuid.UUID], dict[tuple[uuid.UUID, str], dict[str, Any]]]:
    """Server ids and approved tools' input schemas, for the workflow validator."""
    servers = await session.scalars(
        select(McpServer.id).where(McpServer.workspace_id == workspace_id)
    )
    rows = await session.execute(
        select(McpTool.server_id, McpTool.name, McpTool.input_schema).where(
            McpTool.workspace_id == workspace_id, McpTool.status == "approved"
        )
    )
    return frozenset(servers.all()), {(s, n): schema for s, n, schema in rows.all()}
