"""The outbound HTTP guard's own failures look like the HTTP client's."""

from __future__ import annotations

import httpx
import pytest

from backend.kit.http_guard import BlockedAddress, guarded_client


async def test_a_name_that_does_not_resolve_is_a_connect_error() -> None:
    """`.invalid` never resolves (RFC 2606). The resolver's error came out bare
    (socket.gaierror), past every handler that expects httpx's errors: a 500."""
    async with guarded_client([], timeout=5) as client:
        with pytest.raises(httpx.ConnectError, match="does not resolve"):
            await client.get("http://n8n.nothing.invalid/")


async def test_a_private_address_is_refused_before_connecting() -> None:
    async with guarded_client([], timeout=5) as client:
        with pytest.raises(BlockedAddress, match="may not reach"):
            await client.get("http://127.0.0.1:9/")
