"""File and notify node fixtures: the engine's runner (as in tests/engine) with its
storage in a temporary folder and its mail going to the test SMTP server, a local S3
server (moto), a webhook receiver on 127.0.0.1 that keeps every request, and committed
credentials."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings, StorageSettings
from backend.kit.db import UnitOfWork
from backend.kit.http_guard import guarded_client
from backend.models import Credential, Workspace
from tests.support.engine import CredentialMaker, Enqueued, node_settings
from tests.support.factories import CredentialFactory, create
from tests.support.mail import Mailbox
from tests.support.s3 import S3Server, moto_s3
from tests.support.webhooks import Receiver, receiving
from workers.engine.runner import Runner

# tests/nodes/test_template_deadline.py imports Receiver from here (it was being edited
# elsewhere when it moved to tests.support.webhooks).
__all__ = ["Receiver"]


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


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with moto_s3() as server:
        yield server


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving() as r:
        yield r


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
