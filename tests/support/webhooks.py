"""A webhook receiver on 127.0.0.1 that keeps every request and answers as its path
says."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


@dataclass
class Receiver:
    """Answers by path: `/ok` 200, `/status/<code>`, `/flaky/<key>/<n>` 500 n times then
    200, `/redirect` 302. Every request is kept, headers and raw body included."""

    base: str = ""
    deliveries: list[Delivery] = field(default_factory=list)
    hits: Counter[str] = field(default_factory=Counter)

    def to(self, path: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.path == path]


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            path = self.path.lstrip("/")
            receiver.hits[path] += 1
            receiver.deliveries.append(Delivery(path, dict(self.headers.items()), body))
            parts = path.split("/")
            status = 200
            if parts[0] == "status":
                status = int(parts[1])
            elif parts[0] == "flaky" and receiver.hits[path] <= int(parts[2]):
                status = 500
            elif parts[0] == "redirect":
                status = 302
            self.send_response(status)
            if status == 302:
                self.send_header("Location", f"{receiver.base}/ok")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: object) -> None:
            return None

    return Handler


@contextmanager
def receiving() -> Iterator[Receiver]:
    """A Receiver serving on a free loopback port until the block ends."""
    receiver = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(receiver))
    receiver.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
