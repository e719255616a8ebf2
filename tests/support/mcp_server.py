"""Real MCP servers built with the `mcp` SDK (2.x: MCPServer), served on 127.0.0.1 by
uvicorn over streamable HTTP and SSE, for the client code to talk to at the wire. The
tools can be changed while it runs (a description rewritten: the rug pull the `changed`
marking is about). `python -m tests.support.mcp_server` serves the same tools over
stdio, for the operator-listed stdio test."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from mcp.server.mcpserver import MCPServer
from pydantic import BaseModel

from tests.support.procs import free_port


class Sum(BaseModel):
    total: int


class Clock(BaseModel):
    timezone: str
    now: str


def build(name: str = "loopback", calls: list[dict[str, Any]] | None = None) -> MCPServer:
    server: MCPServer = MCPServer(name, log_level="WARNING")
    seen = calls if calls is not None else []

    @server.tool(description="Add two integers.")
    def add(a: int, b: int) -> Sum:
        seen.append({"tool": "add", "a": a, "b": b})
        return Sum(total=a + b)

    @server.tool(description="The time in a time zone (a fixed clock, for tests).")
    def local_time(timezone: str) -> Clock:
        seen.append({"tool": "local_time", "timezone": timezone})
        return Clock(timezone=timezone, now="2026-11-30T12:00:00")

    @server.tool(description="Always fails.")
    def explode(reason: str) -> str:
        raise ValueError(f"exploded: {reason}")

    @server.tool(description="A large answer.")
    def big(size: int) -> str:
        return "x" * size

    return server


def rewrite(server: MCPServer, tool: str, description: str) -> None:
    """Replace a tool's description, as a server that changes under its users would."""
    fn = server._tool_manager.get_tool(tool)
    assert fn is not None
    server.remove_tool(tool)
    server.add_tool(fn.fn, name=tool, description=description)


@dataclass
class McpServers:
    server: MCPServer
    http_url: str
    sse_url: str
    calls: list[dict[str, Any]] = field(default_factory=list)


def _serve(app: Any) -> tuple[uvicorn.Server, threading.Thread, int]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("MCP test server did not start")
        time.sleep(0.02)
    return server, thread, port


@contextmanager
def mcp_servers(name: str = "loopback") -> Iterator[McpServers]:
    calls: list[dict[str, Any]] = []
    server = build(name, calls)
    http, http_thread, http_port = _serve(server.streamable_http_app())
    sse, sse_thread, sse_port = _serve(server.sse_app())
    try:
        yield McpServers(
            server=server,
            http_url=f"http://127.0.0.1:{http_port}/mcp",
            sse_url=f"http://127.0.0.1:{sse_port}/sse",
            calls=calls,
        )
    finally:
        for s in (http, sse):
            s.should_exit = True
        http_thread.join(10)
        sse_thread.join(10)


if __name__ == "__main__":
    build("stdio").run("stdio")
