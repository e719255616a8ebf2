"""Talking to MCP servers through the official `mcp` SDK (2.x), safely.

- HTTP transports (streamable HTTP, SSE) use an httpx2 client whose every connection
  goes through the same address check as our HTTP nodes (backend.kit.http_guard): the
  name is resolved here, private/loopback/link-local/metadata addresses are refused
  unless allow-listed, and the socket opens to the address that was checked. So the
  server URL, the SSE endpoint URL the server hands back and any redirect the SDK
  follows are all judged at connect time, after DNS.
- stdio starts only commands an operator listed in settings (MCP__STDIO_SERVERS), with
  the SDK's minimal inherited environment plus the env names the operator allowed.
- Connect and call timeouts come from settings (per server `timeout_s` may shorten the
  call timeout), and a result larger than MCP__MAX_RESULT_BYTES is refused.

Every connection is opened for one piece of work (a discovery, a call) and closed after:
workers come and go, and a session held across them would be state nobody owns.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import httpcore2
import httpx2

from backend.config import Settings
from backend.kit.http_guard import _allowed
from backend.kit.lazy import lazy_module

if TYPE_CHECKING:
    import mcp
    from mcp.client import sse, stdio, streamable_http
else:
    # The SDK is imported on first use (see backend/kit/lazy.py): most processes never
    # open an MCP session.
    mcp = lazy_module("mcp")
    sse = lazy_module("mcp.client.sse")
    stdio = lazy_module("mcp.client.stdio")
    streamable_http = lazy_module("mcp.client.streamable_http")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class McpFailure(Exception):
    """An MCP connection or call that did not work; `transient` says whether trying
    again later may help (timeouts, connection errors, 5xx) or not (refused address,
    unknown tool, bad arguments, a tool error)."""

    def __init__(self, message: str, *, transient: bool, timeout: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
        self.timeout = timeout


class Blocked(httpcore2.ConnectError):
    """The MCP server's address is one outbound connections may not reach."""


class _GuardedBackend(httpcore2.AsyncNetworkBackend):
    def __init__(self, allow: list[str]) -> None:
        self._inner = httpcore2.AnyIOBackend()
        self._allow: list[Network] = [ipaddress.ip_network(c, strict=False) for c in allow]

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore2's interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        try:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore2.ConnectError(f"{host} does not resolve: {exc}") from exc
        addresses = []
        for *_, sockaddr in infos:
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
            if not _allowed(ip, self._allow):
                raise Blocked(f"{host} resolves to {ip}, which outbound requests may not reach")
            addresses.append(str(ip))
        if not addresses:
            raise Blocked(f"{host} does not resolve")
        return await self._inner.connect_tcp(
            addresses[0],
            port,
            timeout=timeout,
            local_address=local_address,
            socket_options=socket_options,
        )

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore2.AsyncNetworkStream:
        raise Blocked("unix sockets are not reachable")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _GuardedTransport(httpx2.AsyncHTTPTransport):
    def __init__(self, allow: list[str]) -> None:
        # No proxies from the environment: a proxy would connect on our behalf to
        # addresses the guard never saw.
        super().__init__(trust_env=False)
        pool = self._pool
        assert isinstance(pool, httpcore2.AsyncConnectionPool)
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=pool._ssl_context,
            max_connections=pool._max_connections,
            max_keepalive_connections=pool._max_keepalive_connections,
            keepalive_expiry=pool._keepalive_expiry,
            http1=pool._http1,
            http2=pool._http2,
            retries=pool._retries,
            network_backend=_GuardedBackend(allow),
        )


def guarded_http(
    settings: Settings, headers: dict[str, str] | None = None, *, read_timeout_s: float
) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(
        transport=_GuardedTransport(settings.http.allow_private_networks),
        headers={"User-Agent": settings.http.user_agent, **(headers or {})},
        timeout=httpx2.Timeout(settings.mcp.connect_timeout_s, read=read_timeout_s),
        follow_redirects=False,
        trust_env=False,
    )


@dataclass
class Target:
    """Everything needed to reach one server, secrets included (never logged)."""

    transport: str
    url: str | None = None
    command: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: float | None = None


@dataclass
class DiscoveredTool:
    name: str
    description: str
    input_schema: dict[str, Any]

    @property
    def hash(self) -> str:
        return tool_hash(self.name, self.description, self.input_schema)


@dataclass
class Discovery:
    tools: list[DiscoveredTool]
    server_info: dict[str, Any]


def tool_hash(name: str, description: str, input_schema: dict[str, Any]) -> str:
    canonical = json.dumps(
        {"name": name, "description": description, "input_schema": input_schema},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _call_timeout(settings: Settings, target: Target) -> float:
    limit = settings.mcp.call_timeout_s
    return min(limit, target.timeout_s) if target.timeout_s else limit


def _root_cause(exc: BaseException) -> BaseException:
    """The SDK runs transports in task groups: the error that matters is inside."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def classify(exc: BaseException, what: str) -> McpFailure:
    exc = _root_cause(exc)
    if isinstance(exc, McpFailure):
        return exc
    if isinstance(exc, Blocked):
        return McpFailure(f"{what}: {exc}", transient=False)
    if isinstance(exc, TimeoutError | httpx2.TimeoutException):
        return McpFailure(f"{what}: timed out", transient=True, timeout=True)
    if isinstance(exc, httpx2.HTTPStatusError):
        status = exc.response.status_code
        return McpFailure(
            f"{what}: the server answered HTTP {status}",
            transient=status >= 500 or status in (408, 429),
        )
    if isinstance(exc, httpx2.TransportError | httpcore2.NetworkError | OSError):
        # The class only for the HTTP client's protocol errors: they quote the header
        # value they refused (a token). Network errors say what failed to connect.
        said = type(exc).__name__ if isinstance(exc, httpx2.ProtocolError) else str(exc)
        return McpFailure(f"{what}: connection failed: {said}", transient=True)
    if isinstance(exc, mcp.MCPError):
        return McpFailure(f"{what}: the server refused: {exc}", transient=False)
    return McpFailure(f"{what}: {type(exc).__name__}: {exc}", transient=False)


def stdio_parameters(settings: Settings, target: Target) -> mcp.StdioServerParameters:
    allowed = settings.mcp.stdio_servers.get(target.command or "")
    if allowed is None:
        raise McpFailure(
            f"stdio command {target.command!r} is not one an operator listed (MCP__STDIO_SERVERS)",
            transient=False,
        )
    env = {k: v for k, v in target.env.items() if k in allowed.env_keys}
    # The SDK starts from its own minimal set (HOME, LOGNAME, PATH, SHELL, TERM, USER)
    # and adds these: nothing else of the worker's environment (keys!) is passed on.
    return mcp.StdioServerParameters(command=allowed.command, args=list(allowed.args), env=env)


T = TypeVar("T")


async def with_client(
    settings: Settings, target: Target, what: str, work: Callable[[mcp.Client], Awaitable[T]]
) -> T:
    """Open a handshaken session, run `work` on it, close it; all in this task (anyio's
    cancel scopes must be left where they were entered) and within one deadline:
    connect + call timeout. Raises McpFailure; a cancellation passes through."""
    read_timeout = _call_timeout(settings, target)
    http: httpx2.AsyncClient | None = None
    if target.transport == "streamable_http":
        assert target.url
        http = guarded_http(settings, target.headers, read_timeout_s=read_timeout)
        transport: Any = streamable_http.streamable_http_client(target.url, http_client=http)
    elif target.transport == "sse":
        assert target.url

        def factory(
            headers: dict[str, str] | None = None,
            timeout: httpx2.Timeout | None = None,
            auth: httpx2.Auth | None = None,
        ) -> httpx2.AsyncClient:
            return guarded_http(settings, headers, read_timeout_s=read_timeout)

        transport = sse.sse_client(
            target.url,
            headers=dict(target.headers),
            timeout=settings.mcp.connect_timeout_s,
            sse_read_timeout=read_timeout,
            httpx_client_factory=factory,
        )
    elif target.transport == "stdio":
        transport = stdio.stdio_client(stdio_parameters(settings, target), errlog=_stderr_sink())
    else:
        raise McpFailure(f"unknown transport {target.transport!r}", transient=False)
    try:
        with anyio.fail_after(settings.mcp.connect_timeout_s + read_timeout):
            session = mcp.Client(transport, read_timeout_seconds=read_timeout, cache=None)
            async with session as client:
                return await work(client)
    except McpFailure:
        raise
    except Exception as exc:  # ExceptionGroups from the SDK's task groups included
        cause = _root_cause(exc)
        if isinstance(cause, McpFailure):
            raise cause from None
        raise classify(exc, what) from None
    finally:
        if http is not None:
            await http.aclose()


_devnull: Any = None


def _stderr_sink() -> Any:
    """Where a stdio server's stderr goes: discarded (it may echo its env or inputs).
    One handle for the process, not one per call."""
    global _devnull
    if _devnull is None:
        import os

        _devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    return _devnull


async def discover(settings: Settings, target: Target) -> Discovery:
    """Handshake and list every tool (following pages), bounded by the settings."""

    async def work(client: mcp.Client) -> Discovery:
        tools: list[DiscoveredTool] = []
        cursor: str | None = None
        for _ in range(100):
            page = await client.list_tools(cursor=cursor)
            for tool in page.tools:
                tools.append(
                    DiscoveredTool(
                        name=tool.name,
                        description=tool.description or "",
                        input_schema=dict(tool.input_schema or {"type": "object"}),
                    )
                )
                if len(tools) > settings.mcp.max_tools:
                    raise McpFailure(
                        f"the server lists more than {settings.mcp.max_tools} tools "
                        "(MCP__MAX_TOOLS)",
                        transient=False,
                    )
            cursor = page.next_cursor
            if not cursor:
                break
        info = client.server_info
        server_info: dict[str, Any] = (
            {"name": info.name, "version": info.version} if info is not None else {}
        )
        server_info["protocol_version"] = client.protocol_version
        return Discovery(tools=tools, server_info=server_info)

    return await with_client(settings, target, "connect", work)


def _text_of(content: list[Any]) -> str:
    parts = []
    for block in content:
        text = getattr(block, "text", None)
        if isinstance(text, str):
            parts.append(text)
    return "\n".join(parts)


async def call(
    settings: Settings, target: Target, tool: str, arguments: dict[str, Any]
) -> dict[str, Any]:
    """Call one tool; the answer is {structured, text, content}. A tool's own error
    (is_error) raises a permanent McpFailure carrying its text."""

    async def work(client: mcp.Client) -> Any:
        return await client.call_tool(tool, arguments)

    result = await with_client(settings, target, f"call {tool}", work)
    content = [block.model_dump(mode="json", exclude_none=True) for block in result.content]
    text = _text_of(result.content)
    if result.is_error:
        raise McpFailure(f"tool {tool} failed: {text[:2000] or 'no detail'}", transient=False)
    answer = {"structured": result.structured_content, "text": text, "content": content}
    size = len(json.dumps(answer, default=str))
    if size > settings.mcp.max_result_bytes:
        raise McpFailure(
            f"tool {tool} answered {size} bytes, over MCP__MAX_RESULT_BYTES "
            f"({settings.mcp.max_result_bytes})",
            transient=False,
        )
    return answer
