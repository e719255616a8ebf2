"""Outbound HTTP that cannot be pointed at our own network (SSRF).

The check happens where the socket is opened: the transport resolves the name itself,
refuses private, loopback, link-local, multicast, reserved and cloud-metadata
addresses (unless an operator allow-listed them), and connects to the address it
checked — so neither a DNS answer that changes between check and connect nor a
redirect can slip past. Redirects are followed one hop at a time through the same
transport, each hop checked again.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

import anyio
import httpcore
import httpx

METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
# Ranges Python's is_global has called global in some versions but that are not the
# open internet: IETF protocol assignments (Oracle's old metadata at 192.0.0.192).
NOT_PUBLIC = [ipaddress.ip_network("192.0.0.0/24"), ipaddress.ip_network("100.64.0.0/10")]


class BlockedAddress(httpx.TransportError):
    """The destination resolves to an address outbound requests may not reach."""


class Unresolvable(httpx.ConnectError):
    """The destination's name does not resolve (no such name, no DNS answer). An
    httpx.ConnectError, so whatever handles a refused connection handles it; its own
    class for callers that tell a bad URL from a down host (tools/web.py)."""


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, allow: Iterable[Network]) -> bool:
    if any(ip in net for net in allow):
        return True
    if ip in METADATA:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv6 address that carries an IPv4 one is judged by the IPv4 one.
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            return _allowed(embedded, allow)
    if any(ip in net for net in NOT_PUBLIC if net.version == ip.version):
        return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, allow: list[str]) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._allow = [ipaddress.ip_network(cidr, strict=False) for cidr in allow]

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:  # socket.gaierror: no such name, no DNS answer
            # Raised bare, it escaped every handler that expects httpx's errors: a 500.
            raise Unresolvable(f"{host} does not resolve ({exc.strerror or exc})") from exc
        addresses = []
        for *_, sockaddr in infos:
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
            if not _allowed(ip, self._allow):
                raise BlockedAddress(
                    f"{host} resolves to {ip}, which outbound requests may not reach"
                )
            addresses.append(str(ip))
        if not addresses:
            raise BlockedAddress(f"{host} does not resolve")
        # Connect to the address that was checked, not to the name again.
        return await self._inner.connect_tcp(
            addresses[0],
            port,
            timeout=timeout,
            local_address=local_address,
            socket_options=socket_options,
        )

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        raise BlockedAddress("unix sockets are not reachable from nodes")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, allow: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # httpx builds its connection pool without a way to pass a network backend;
        # rebuild it with ours, keeping the TLS context httpx prepared.
        pool = self._pool
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=pool._ssl_context,
            max_connections=pool._max_connections,
            max_keepalive_connections=pool._max_keepalive_connections,
            keepalive_expiry=pool._keepalive_expiry,
            http1=pool._http1,
            http2=pool._http2,
            retries=pool._retries,
            network_backend=GuardedBackend(allow),
        )


def guarded_client(
    allow: list[str], *, timeout: float = 30.0, user_agent: str = ""
) -> httpx.AsyncClient:
    """A client whose every connection is checked. Redirects are not followed by httpx:
    `fetch` follows them, so each hop's address is checked again."""
    return httpx.AsyncClient(
        transport=GuardedTransport(allow),
        timeout=timeout,
        follow_redirects=False,
        headers={"User-Agent": user_agent} if user_agent else None,
    )


async def fetch(
    client: httpx.AsyncClient,
    request: httpx.Request,
    *,
    max_redirects: int,
    max_bytes: int,
    secret_headers: set[str] | frozenset[str] = frozenset(),
) -> tuple[httpx.Response, bytes]:
    """Send, follow redirects hop by hop, and read at most `max_bytes` of the body."""
    for _ in range(max_redirects + 1):
        response = await client.send(request, stream=True)
        if response.is_redirect and response.next_request is not None:
            await response.aclose()
            request = response.next_request
            # Credentials never follow a redirect to another origin (scheme, host or
            # port): not to another site, and not from https down to http.
            before, after = response.request.url, request.url
            if (before.scheme, before.host, before.port) != (after.scheme, after.host, after.port):
                for name in {"authorization", "x-api-key", "cookie", *secret_headers}:
                    request.headers.pop(name, None)
            continue
        body = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                body.extend(chunk)
                if len(body) > max_bytes:
                    raise ResponseTooLarge(f"response larger than {max_bytes} bytes")
        finally:
            await response.aclose()
        return response, bytes(body)
    raise TooManyRedirects(f"more than {max_redirects} redirects")


class ResponseTooLarge(Exception):
    pass


class TooManyRedirects(Exception):
    pass
