"""Live-progress benchmark (issue: live progress): N concurrent WebSocket clients follow
executions through a real uvicorn and worker; events delivered and lost, latency from
the event's commit-time timestamp to the client, and the API process's memory per
idle connection.

Each run first calls a local HTTP endpoint that answers only once every client is
connected, so the rest of the run happens in front of all of them; clients ask for
`resume_from: 0`, so each must receive every event of its run (lost must be 0)."""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


async def _client(
    url: str, token: str, connected: asyncio.Event, results: list[dict[str, Any]]
) -> None:
    received: list[int] = []
    latencies: list[tuple[float, float]] = []
    final: int | None = None
    code: int | None = None
    async with websockets.connect(url, max_size=None, open_timeout=60) as ws:
        await ws.send(json.dumps({"token": token, "resume_from": 0}))
        connected.set()
        try:
            while True:
                raw = await asyncio.wait_for(ws.recv(), 60)
                now = time.time()
                body = json.loads(raw)
                if "seq" not in body:
                    continue
                received.append(body["seq"])
                latencies.append((now, datetime.fromisoformat(body["timestamp"]).timestamp()))
                if body["type"] == "execution.status" and body["status"] in (
                    "completed",
                    "failed",
                    "cancelled",
                ):
                    final = body["seq"]
        except websockets.ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd else None
    results.append({"received": received, "latencies": latencies, "final": final, "code": code})


async def measure_streams(
    base: str, headers: dict[str, str], api_pid: int, gate: Gate, clients: int
) -> dict[str, Any]:
    token = headers["Authorization"].removeprefix("Bearer ")
    api = psutil.Process(api_pid)
    gate.reset()
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        r = await http.post(
            "/api/v1/workflows",
            headers=headers,
            json={"name": f"bench streams {clients}", **definition(gate.url)},
        )
        r.raise_for_status()
        wf = r.json()["id"]
        rss_before = api.memory_info().rss
        ids = []
        for _ in range(EXECUTIONS):
            r = await http.post("/api/v1/executions", headers=headers, json={"workflow_id": wf})
            r.raise_for_status()
            ids.append(r.json()["id"])
    ws_base = base.replace("http://", "ws://")
    results: list[dict[str, Any]] = []
    events = [asyncio.Event() for _ in range(clients)]
    tasks = []
    t0 = time.monotonic()
    for i in range(clients):
        url = f"{ws_base}/api/v1/ws/executions/{ids[i % EXECUTIONS]}"
        tasks.append(asyncio.create_task(_client(url, token, events[i], results)))
        if i % 50 == 49:
            await asyncio.sleep(0)  # let the handshakes progress
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 240)
    connect_s = time.monotonic() - t0
    await asyncio.sleep(1.0)  # every hello answered, the catch-up sent
    rss_connected = api.memory_info().rss
    connected_at = time.time()
    gate.opened.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    delivered = sum(len(res["received"]) for res in results)
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
        # Closed by the server before the end (4401 hello timeout, 4408 too slow, ...).
        "closed_early": sum(1 for res in results if res["code"] not in (None, 1000)),
        "p50_ms": statistics.median(live) if live else float("nan"),
        "p95_ms": live[int(len(live) * 0.95)] if live else float("nan"),
        "connect_s": connect_s,
        "kb_per_conn": (rss_connected - rss_before) / 1024 / clients,
    }
