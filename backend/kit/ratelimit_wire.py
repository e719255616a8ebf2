"""The rate limit's own connection to Redis: one socket, requests pipelined on it,
replies matched in order (Redis answers a connection's commands in the order it got
them). Only for the capacity budget's hit on every signed-in request (one EVALSHA,
backend/kit/ratelimit.py): through redis-py each call paid a pool checkout and return,
a retry wrapper, an event dispatch and a timeout context on the write and on the read,
~0.1 ms of CPU of a ~1.3 ms read, more than the round trip itself.

Plain `redis://` URLs only (host, port, user, password, database); anything else (TLS,
a Unix socket, query options) keeps redis-py (`Wire.for_url` answers None). Failures
raise redis-py's own exceptions (ConnectionError, TimeoutError, NoScriptError,
ResponseError), so the limiter handles both paths alike. A request that gets no answer
within the timeout fails, and so does everything else in flight on the connection:
it is closed (a late reply would be matched to the wrong request) and the next call
opens another.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

_MORE = object()  # the buffer ends inside a reply


def pack(*args: str | int | bytes) -> bytes:
    """A command in RESP (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def parse(buf: bytes | bytearray, pos: int) -> tuple[Any, int]:
    """One RESP2 reply from `pos`: (value, position after it), or (_MORE, pos) when the
    buffer ends before the reply does. An error reply is a ResponseError value."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return _MORE, pos
    kind = buf[pos]
    line = bytes(buf[pos + 1 : end])
    after = end + 2
    if kind == 58:  # ':' integer
        return int(line), after
    if kind == 42:  # '*' array
        count = int(line)
        if count < 0:
            return None, after
        items = []
        for _ in range(count):
            item, after = parse(buf, after)
            if item is _MORE:
                return _MORE, pos
            items.append(item)
        return items, after
    if kind == 36:  # '$' bulk string
        size = int(line)
        if size < 0:
            return None, after
        if len(buf) < after + size + 2:
            return _MORE, pos
        return bytes(buf[after : after + size]), after + size + 2
    if kind == 43:  # '+' simple string
        return line.decode(), after
    if kind == 45:  # '-' error
        message = line.decode(errors="replace")
        if message.startswith("NOSCRIPT"):
            return NoScriptError(message), after
        return ResponseError(message), after
    raise RedisConnectionError(f"unexpected reply from Redis: {bytes(buf[pos:end])[:40]!r}")


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports (what uvicorn runs on)
        # implement the interface without subclassing asyncio.Transport.
        self.transport = cast("asyncio.Transport", transport)

    async def request(self, data: bytes, timeout_s: float) -> Any:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append(future)
        self.transport.write(data)
        timer = loop.call_later(timeout_s, self._timed_out, future)
        try:
            reply = await future
        finally:
            timer.cancel()
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    def _timed_out(self, future: asyncio.Future[Any]) -> None:
        if not future.done():
            self._close(RedisTimeoutError("Redis did not answer in time"))

    def data_received(self, data: bytes) -> None:
        self._buf += data
        pos = 0
        try:
            while pos < len(self._buf):
                reply, after = parse(self._buf, pos)
                if reply is _MORE:
                    break
                pos = after
                if not self._waiting:
                    raise RedisConnectionError("a reply from Redis nobody asked for")
                future = self._waiting.popleft()
                if not future.done():
                    future.set_result(reply)
        except (RedisConnectionError, ValueError) as exc:
            self._close(RedisConnectionError(str(exc)))
            return
        del self._buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self._close(RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def _close(self, error: Exception) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)


class Wire:
    """Pipelined requests on one connection, opened on first use and again after a
    failure."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        timeout_s: float,
        connect_timeout_s: float,
    ) -> None:
        self._host, self._port, self._db = host, port, db
        self._username, self._password = username, password
        self._timeout_s, self._connect_timeout_s = timeout_s, connect_timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None

    @classmethod
    def for_url(cls, url: str, *, timeout_s: float, connect_timeout_s: float) -> Wire | None:
        """A Wire for a plain `redis://host:port/db` URL (user and password allowed);
        None for anything this client does not speak (TLS, Unix sockets, options)."""
        parts = urlsplit(url)
        if parts.scheme != "redis" or parts.query or parts.fragment:
            return None
        path = parts.path.strip("/")
        if path and not path.isdigit():
            return None
        try:
            port = parts.port or 6379
        except ValueError:
            return None
        return cls(
            parts.hostname or "localhost",
            port,
            db=int(path or 0),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
        )

    async def call(self, *args: str | int | bytes) -> Any:
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connect()
        return await protocol.request(pack(*args), self._timeout_s)

    async def _connect(self) -> _Protocol:
        # Requests arriving while a connection opens wait for that one.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, protocol = await loop.create_connection(_Protocol, self._host, self._port)
        except TimeoutError:
            raise RedisTimeoutError("timed out connecting to Redis") from None
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to Redis: {exc}") from None
        try:
            if self._password is not None:
                auth = (self._username, self._password) if self._username else (self._password,)
                await protocol.request(pack("AUTH", *auth), self._timeout_s)
            if self._db:
                await protocol.request(pack("SELECT", self._db), self._timeout_s)
        except BaseException:
            protocol._close(RedisConnectionError("connection setup failed"))
            raise
        self._protocol = protocol
        return protocol

    def close(self) -> None:
        if self._protocol is not None:
            self._protocol._close(RedisConnectionError("closed"))
            self._protocol = None
