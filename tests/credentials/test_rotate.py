"""`make rotate-keys` (python -m backend.credentials.rotate) re-encrypts every sealed
secret, MCP servers' headers and env values included: afterwards they open with the
new key alone, and with the old one no longer."""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.config import Settings
from backend.credentials.rotate import rotate_everything
from backend.credentials.service import reveal
from backend.kit.crypto import SecretBox
from backend.kit.db import UnitOfWork, create_engine, create_sessionmaker
from backend.mcp.service import secrets_of
from backend.models import Credential, McpServer, Workspace
from tests.support.databases import drop_database, migrate, recreate_database, with_database
from tests.support.factories import WorkspaceFactory, create
from tests.support.identity import Actor
from tests.support.paths import ROOT
from tests.support.procs import PYTHON, python_env

CANARY = "mcp-header-canary"


def with_keys(settings: Settings, current: SecretStr, previous: list[SecretStr]) -> Settings:
    security = settings.security.model_copy(
        update={"encryption_key": current, "previous_encryption_keys": previous}
    )
    return settings.model_copy(update={"security": security})


async def test_rotation_re_encrypts_mcp_server_secrets(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, editor: Actor
) -> None:
    made = await client.post(
        "/api/v1/mcp/servers",
        headers=editor.headers,
        json={
            "name": "gh",
            "transport": "streamable_http",
            "url": "https://mcp.example.com/mcp",
            "headers": {"Authorization": f"Bearer {CANARY}"},
        },
    )
    assert made.status_code == 201, made.text
    cred = await client.post(
        "/api/v1/credentials",
        headers=editor.headers,
        json={"name": "k", "secret": {"type": "bearer", "token": CANARY}},
    )
    assert cred.status_code == 201, cred.text
    server = await session.get(McpServer, uuid.UUID(made.json()["id"]))
    assert server is not None and server.secrets_encrypted is not None
    before = server.secrets_encrypted
    new_key = SecretStr("a-brand-new-encryption-key-" + uuid.uuid4().hex)
    counts = await rotate_everything(
        session, with_keys(settings, new_key, [settings.security.encryption_key])
    )
    assert counts["MCP servers"] >= 1 and counts["credentials"] >= 1
    await session.refresh(server)
    assert server.secrets_encrypted != before
    only_new = with_keys(settings, new_key, [])
    assert secrets_of(only_new, server)[0] == {"Authorization": f"Bearer {CANARY}"}
    with pytest.raises(ValueError, match="cannot decrypt"):
        secrets_of(settings, server)
    credential = await session.get(Credential, uuid.UUID(cred.json()["id"]))
    assert credential is not None
    await session.refresh(credential)
    assert reveal(only_new, credential)["token"] == CANARY


async def test_servers_without_secrets_are_left_alone(
    session: AsyncSession, settings: Settings, team: Workspace
) -> None:
    bare = McpServer(
        id=uuid.uuid4(), workspace_id=team.id, name="bare", transport="sse",
        url="https://mcp.example.com/sse",
    )  # fmt: skip
    session.add(bare)
    await session.flush()
    new_key = SecretStr("another-new-encryption-key-" + uuid.uuid4().hex)
    await rotate_everything(
        session, with_keys(settings, new_key, [settings.security.encryption_key])
    )
    await session.refresh(bare)
    assert bare.secrets_encrypted is None


@pytest.fixture
def scratch_database(admin_database_url: str) -> Any:
    """A database of its own, migrated: the command commits and rotates every row, which
    must not touch the rows other tests of this worker sealed with the test key."""
    name = f"orch_rotate_{uuid.uuid4().hex[:8]}"
    recreate_database(admin_database_url, name)
    url = with_database(admin_database_url, name)
    try:
        migrate(url)
        yield url
    finally:
        drop_database(admin_database_url, name)


async def test_the_rotate_command_moves_mcp_secrets_to_the_new_key(
    settings: Settings, scratch_database: str
) -> None:
    old_key = SecretStr("the-old-encryption-key-" + uuid.uuid4().hex)
    new_key = SecretStr("the-new-encryption-key-" + uuid.uuid4().hex)
    scratch = settings.model_copy(update={"database_url": scratch_database})
    engine = create_engine(scratch)
    try:
        async with UnitOfWork(create_sessionmaker(engine)) as uow:
            workspace = await create(uow.session, WorkspaceFactory)
            server = McpServer(
                id=uuid.uuid4(), workspace_id=workspace.id, name="s", transport="sse",
                url="https://mcp.example.com/sse",
            )  # fmt: skip
            payload = {
                "id": str(server.id),
                "workspace_id": str(workspace.id),
                "headers": {"X-Token": CANARY},
                "env": {},
            }
            server.secrets_encrypted = SecretBox(with_keys(settings, old_key, [])).seal(
                json.dumps(payload)
            )
            uow.session.add(server)
        done = subprocess.run(  # noqa: ASYNC221 - a short command the test waits for
            [PYTHON, "-m", "backend.credentials.rotate"],
            cwd=ROOT,
            env=python_env(
                DATABASE_URL=scratch_database,
                SECURITY__ENCRYPTION_KEY=new_key.get_secret_value(),
                SECURITY__PREVIOUS_ENCRYPTION_KEYS=json.dumps([old_key.get_secret_value()]),
            ),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "1 MCP servers" in done.stdout
        assert CANARY not in done.stdout + done.stderr
        async with create_sessionmaker(engine)() as session:
            row = (await session.scalars(select(McpServer))).one()
            assert secrets_of(with_keys(settings, new_key, []), row)[0] == {"X-Token": CANARY}
            with pytest.raises(ValueError, match="cannot decrypt"):
                secrets_of(with_keys(settings, old_key, []), row)
    finally:
        await engine.dispose()
