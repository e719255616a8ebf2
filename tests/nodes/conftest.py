"""File and notify node fixtures: the engine's runner (as in tests/engine) with its
storage in a temporary folder and its mail going to the test SMTP server, a local S3
server (moto), and a webhook receiver on 127.0.0.1 that keeps every request."""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest
from moto.server import ThreadedMotoServer
from pydantic import SecretStr
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings, StorageSettings
from backend.kit.db import UnitOfWork
from backend.kit.http_guard import guarded_client
from backend.models import Credential, Workspace
from tests.support.engine import Enqueued, loopback_settings
from tests.support.factories import CredentialFactory, create
from tests.support.mail import Mailbox
from tests.support.procs import free_port
from workers.engine.runner import Runner

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def node_settings(
    settings: Settings, storage: StorageSettings, smtp_port: int | None = None
) -> Settings:
    smtp = settings.smtp
    if smtp_port is not None:
        smtp = smtp.model_copy(
            update={"host": "127.0.0.1", "port": smtp_port, "starttls": False, "timeout_s": 5}
        )
    return loopback_settings(settings).model_copy(update={"storage": storage, "smtp": smtp})


@pytest.fixture
def storage_root(tmp_path: Path) -> Path:
    return tmp_path / "files"


@pytest.fixture
async def runner(
    settings: Settings,
    maker: async_sessionmaker[AsyncSession],
    storage_root: Path,
    mailbox: Mailbox,
    smtp_port: int,
) -> AsyncIterator[Runner]:
    local = node_settings(settings, StorageSettings(local_root=str(storage_root)), smtp_port)
    async with guarded_client(["127.0.0.1/32"]) as http:
        yield Runner(local, maker, http, f"test-{uuid.uuid4().hex[:6]}", Enqueued())


# S3 -------------------------------------------------------------------------------------


@dataclass
class S3Server:
    endpoint: str
    bucket: str

    def settings(self, prefix: str = "studio/") -> StorageSettings:
        return StorageSettings(
            backend="s3",
            s3_endpoint_url=self.endpoint,
            s3_bucket=self.bucket,
            s3_region="us-east-1",
            s3_access_key_id=SecretStr("test-key"),
            s3_secret_access_key=SecretStr("test-secret"),
            s3_prefix=prefix,
            s3_addressing_style="path",
            s3_timeout_s=5,
        )

    def client(self) -> S3Client:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="test-key",
            aws_secret_access_key="test-secret",
        )


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port, stopped after the module."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        s3 = S3Server(f"http://127.0.0.1:{port}", f"studio-{uuid.uuid4().hex[:8]}")
        s3.client().create_bucket(Bucket=s3.bucket)
        yield s3
    finally:
        server.stop()


# Webhook receiver -------------------------------------------------------------------------


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


@pytest.fixture
def receiver() -> Iterator[Receiver]:
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


CredentialMaker = Callable[[Workspace, dict[str, object]], Awaitable[uuid.UUID]]


@pytest.fixture
async def add_credential(
    maker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[CredentialMaker]:
    """Makes credential rows sealed the way the credentials service seals them, and
    deletes them afterwards: they are committed, and other tests (key rotation) read
    every credential in the database."""
    made: list[uuid.UUID] = []

    async def add(workspace: Workspace, data: dict[str, object]) -> uuid.UUID:
        async with UnitOfWork(maker) as uow:
            credential = await create(
                uow.session, CredentialFactory, workspace_id=workspace.id, data=data
            )
        made.append(credential.id)
        return credential.id

    yield add
    async with UnitOfWork(maker) as uow:
        await uow.session.execute(delete(Credential).where(Credential.id.in_(made)))
