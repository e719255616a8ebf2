"""Live-progress benchmark (issue: live progress): N concurrent WebSocket clients follow
executions through a real uvicorn and worker; events delivered and lost, latency from
the event's commit-time timestamp to the client, and the API process's memory per
idle connection.

Each run first calls a local HTTP endpoint that answers only once every client is
following (its hello answered: it received the run's first events), so the rest of the
run happens in front of all of them; clients ask for `resume_from: 0`, so each must
receive every event of its run (lost must be 0). Counting a client as there once its
handshake was done measured, on a loaded machine, how long the API took to answer a
thousand hellos (seconds), not how long an event took to reach a follower.

Clients ask for batched frames (`?batch=1`: the events waiting for a client go as one
JSON array); each event's latency is the arrival of the frame that carried it.
BENCH_STREAM_BATCH=0 follows with one frame per event, as before."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psutil
import websockets

EXECUTIONS = 2
CHAIN = 10


class Gate:
    """A local HTTP endpoint that holds every request until it is opened."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.url = ""

    def reset(self) -> None:
        self.opened.clear()


@contextmanager
def slow_server() -> Iterator[Gate]:
    gate = Gate()

    class Held(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            gate.opened.wait(300)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *_: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Held)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    gate.url = f"http://127.0.0.1:{server.server_address[1]}/gate"
    try:
        yield gate
    finally:
        gate.opened.set()
        server.shutdown()
        server.server_close()


def definition(gate_url: str) -> dict[str, Any]:
    wait = {"kind": "http_request", "url": gate_url, "timeout_s": 300}
    nodes: list[dict[str, Any]] = [
        {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
        {"id": "wait", "type": "action", "config": wait, "timeout_s": 300},
    ]
    conns = [{"source": "start", "target": "wait"}]
    previous = "wait"
    for i in range(CHAIN):
        template = "{{ " + str(i) + " }}"
        config = {"kind": "transform", "template": template}
        nodes.append({"id": f"n{i}", "type": "logic", "config": config})
        conns.append({"source": previous, "target": f"n{i}"})
        previous = f"n{i}"
    return {"nodes": nodes, "connections": conns}


def _result(frames: list[tuple[float, bytes | str]], code: int | None) -> dict[str, Any]:
    """What a client saw, parsed after the run (so parsing never delays a receive)."""
    received: list[int] = []
    latencies: list[tuple[float, float]] = []
    kinds: list[str] = []
    final: int | None = None
    for now, body in _messages(frames):
        if "seq" not in body:
            continue
        received.append(body["seq"])
        latencies.append((now, datetime.fromisoformat(body["timestamp"]).timestamp()))
        kinds.append(f"{body['type']}:{body.get('node_id')}:{body.get('status')}")
        if body["type"] == "execution.status" and body["status"] in TERMINAL:
            final = body["seq"]
    return {
        "received": received,
        "latencies": latencies,
        "final": final,
        "code": code,
        "kinds": kinds,
        "frames": len(frames),
    }


def _messages(frames: list[tuple[float, bytes | str]]) -> Iterator[tuple[float, dict[str, Any]]]:
    """Each message with the arrival time of its frame: a batched frame (a JSON array)
    carries several."""
    for now, raw in frames:
        body = json.loads(raw)
        for item in body if isinstance(body, list) else (body,):
            yield now, item


TERMINAL = ("completed", "failed", "cancelled")


async def _library_client(
    url: str, hello: bytes, connected: asyncio.Event, results: list[dict[str, Any]]
) -> None:
    """A client on the `websockets` library (BENCH_STREAM_CLIENT=websockets): about
    20 µs of this process's CPU per message, so at 1000 sockets the client itself is
    most of what is measured (see `RawClient`)."""
    frames: list[tuple[float, bytes | str]] = []
    code: int | None = None
    async with websockets.connect(url, max_size=None, open_timeout=60) as ws:
        await ws.send(hello.decode())
        try:
            while True:
                raw = await asyncio.wait_for(ws.recv(), 60)
                frames.append((time.time(), raw))
                connected.set()
        except websockets.ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd else None
        finally:
            connected.set()
    results.append(_result(frames, code))


class RawClient(asyncio.Protocol):
    """A minimal WebSocket client (RFC 6455: handshake, masked text frames out,
    unfragmented frames in, ping, close) that only stamps each message with its arrival
    time; parsing waits until the run is over. A few µs per message: the figure is the
    server's, not the client's."""

    def __init__(self, host: str, path: str, hello: bytes, connected: asyncio.Event) -> None:
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n\r\n"
        ).encode()
        self.hello = hello
        self.connected = connected
        self.buffer = bytearray()
        self.open = False
        self.frames: list[tuple[float, bytes | str]] = []
        self.code: int | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        # Why it never opened (the server's answer, or the connection's error).
        self.error: str | None = None

    @staticmethod
    def frame(opcode: int, payload: bytes) -> bytes:
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return head + mask + masked

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buf = self.buffer
        buf += data
        assert self.transport is not None
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.error = bytes(buf[: buf.find(b"\r\n")]).decode(errors="replace")
                self.transport.close()
                return
            del buf[: end + 4]
            self.open = True
            self.transport.write(self.frame(0x1, self.hello))
        i, n = 0, len(buf)
        while n - i >= 2:
            length, head = buf[i + 1] & 0x7F, 2
            if length == 126:
                if n - i < 4:
                    break
                length, head = int.from_bytes(buf[i + 2 : i + 4], "big"), 4
            elif length == 127:
                if n - i < 10:
                    break
                length, head = int.from_bytes(buf[i + 2 : i + 10], "big"), 10
            if n - i < head + length:
                break
            opcode = buf[i] & 0x0F
            payload = bytes(buf[i + head : i + head + length])
            i += head + length
            if opcode == 0x1:
                self.frames.append((now, payload))
                self.connected.set()
            elif opcode == 0x9:
                self.transport.write(self.frame(0xA, payload))
            elif opcode == 0x8:
                self.code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                self.transport.write(self.frame(0x8, payload[:2]))
                self.transport.close()
        del buf[:i]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.open and self.error is None:
            self.error = repr(exc) if exc else "closed during the handshake"
        # Closed before its first event (refused, 4429, ...): not one to wait for.
        self.connected.set()
        if not self.closed.done():
            self.closed.set_result(None)


async def _raw_client(
    url: str, hello: bytes, connected: asyncio.Event, results: list[dict[str, Any]]
) -> None:
    rest = url.removeprefix("ws://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(
        lambda: RawClient(hostport, "/" + path, hello, connected), host, int(port)
    )
    await asyncio.wait_for(client.closed, 180)
    results.append({**_result(client.frames, client.code), "error": client.error})


class ApiProcesses:
    """The API as the Procfile runs it: uvicorn's supervisor and its worker processes
    (one per core). Memory and CPU are the sum over all of them."""

    def __init__(self, pid: int) -> None:
        self.main = psutil.Process(pid)

    def all(self) -> list[psutil.Process]:
        return [self.main, *self.main.children(recursive=True)]

    def servers(self) -> int:
        """The processes that serve requests: uvicorn's workers, or the one process
        (multiprocessing's resource tracker is a child too, and serves nothing)."""
        children = [
            p for p in self.main.children()
            if not any("resource_tracker" in part for part in p.cmdline())
        ]  # fmt: skip
        return len(children) or 1

    def rss(self) -> int:
        return sum(p.memory_info().rss for p in self.all())

    def cpu_s(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self.all())


def _profile(api_pid: int, clients: int) -> list[Any]:
    """BENCH_STREAM_PROFILE=<prefix>: py-spy records the API process and this one for
    the live part (`uv run --with py-spy`), as raw stacks in <prefix>.<clients>.*.txt."""
    import subprocess

    prefix = os.environ.get("BENCH_STREAM_PROFILE")
    if not prefix:
        return []
    api = ApiProcesses(api_pid)
    secs = os.environ.get("BENCH_STREAM_PROFILE_S", "4")
    return [
        subprocess.Popen(
            [
                *("py-spy", "record", "-r", "500", "-f", "raw", "-d", secs, "-p", str(pid)),
                *os.environ.get("BENCH_STREAM_PROFILE_ARGS", "").split(),
                *("-o", f"{prefix}.{clients}.{name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in (
            # The worker processes (the supervisor only watches them), or the one process.
            *((f"api{i}", p.pid) for i, p in enumerate(api.all()[1:] or api.all())),
            ("client", os.getpid()),
        )
    ]


async def measure_streams(
    base: str, headers: dict[str, str], api_pid: int, gate: Gate, clients: int
) -> dict[str, Any]:
    token = headers["Authorization"].removeprefix("Bearer ")
    api = ApiProcesses(api_pid)
    gate.reset()
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        r = await http.post(
            "/api/v1/workflows",
            headers=headers,
            json={"name": f"bench streams {clients}", **definition(gate.url)},
        )
        r.raise_for_status()
        wf = r.json()["id"]
        rss_before = api.rss()
        ids = []
        for _ in range(EXECUTIONS):
            r = await http.post("/api/v1/executions", headers=headers, json={"workflow_id": wf})
            r.raise_for_status()
            ids.append(r.json()["id"])
    ws_base = base.replace("http://", "ws://")
    results: list[dict[str, Any]] = []
    events = [asyncio.Event() for _ in range(clients)]
    tasks = []
    client = (
        _library_client if os.environ.get("BENCH_STREAM_CLIENT") == "websockets" else _raw_client
    )
    hello = json.dumps({"token": token, "resume_from": 0}).encode()
    t0 = time.monotonic()
    query = "" if os.environ.get("BENCH_STREAM_BATCH") == "0" else "?batch=1"
    for i in range(clients):
        url = f"{ws_base}/api/v1/ws/executions/{ids[i % EXECUTIONS]}{query}"
        tasks.append(asyncio.create_task(client(url, hello, events[i], results)))
        if i % 50 == 49:
            await asyncio.sleep(0)  # let the handshakes progress
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 240)
    except TimeoutError:
        waiting = sum(1 for e in events if not e.is_set())
        raise RuntimeError(f"{waiting} of {clients} clients got no event in 240 s") from None
    connect_s = time.monotonic() - t0
    await asyncio.sleep(0.5)
    rss_connected = api.rss()
    connected_at = time.time()
    spies = _profile(api_pid, clients)
    api_cpu, own_cpu = api.cpu_s(), time.process_time()
    gate.opened.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    # CPU seconds from the gate to the last close: the API process, and this one (the
    # clients), so a client that costs more than the server shows.
    api_cpu, own_cpu = api.cpu_s() - api_cpu, time.process_time() - own_cpu
    for spy in spies:
        spy.wait()
    if os.environ.get("BENCH_STREAM_DUMP"):
        # BENCH_STREAM_DUMP=<prefix>: every client's messages and arrival times, to study.
        dump = json.dumps({"connected_at": connected_at, "results": results})
        path = Path(f"{os.environ['BENCH_STREAM_DUMP']}.{clients}.json")
        await asyncio.to_thread(path.write_text, dump)
    delivered = sum(len(res["received"]) for res in results)
    # Never opened (refused, reset during the handshake on a loaded machine): counted
    # apart, they never followed anything.
    failed = [res for res in results if res.get("error")]
    for error in sorted({res["error"] for res in failed}):
        print(f"  {sum(1 for r in failed if r['error'] == error)} clients did not open: {error}")
    results = [res for res in results if not res.get("error")]
    frames = sum(res["frames"] for res in results)
    print(
        f"  {clients} clients: {delivered} events in {frames} frames ({query or 'unbatched'}), "
        f"API in {api.servers()} process(es)"
    )
    lost = 0
    for res in results:
        expected = res["final"] or 0
        if expected == 0:
            lost += 1  # never saw the end: at least the last event is missing
        lost += len(set(range(1, expected + 1)) - set(res["received"]))
    live = [
        (recv - sent) * 1000
        for res in results
        for recv, sent in res["latencies"]
        if sent >= connected_at
    ]
    live.sort()
    return {
        "clients": clients,
        "delivered": delivered,
        "lost": lost,
        "finished": sum(1 for res in results if res["final"]),
        "failed": len(failed),
        # Closed by the server before the end (4401 hello timeout, 4408 too slow, ...).
        "closed_early": sum(1 for res in results if res["code"] not in (None, 1000)),
        "p50_ms": statistics.median(live) if live else float("nan"),
        "p95_ms": live[int(len(live) * 0.95)] if live else float("nan"),
        "max_ms": live[-1] if live else float("nan"),
        "api_cpu_s": api_cpu,
        "client_cpu_s": own_cpu,
        "connect_s": connect_s,
        "kb_per_conn": (rss_connected - rss_before) / 1024 / clients,
    }
