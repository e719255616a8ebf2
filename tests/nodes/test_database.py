"""The database action against a real PostgreSQL (the test server on 127.0.0.1, reached
through a `postgres` credential): bind parameters, read-only by default, one statement,
row caps, and the SSRF rules on the host."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import delete
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.kit.db import UnitOfWork
from backend.kit.http_guard import guarded_client
from backend.models import Credential, Workspace
from tests.support.definitions import trig
from tests.support.engine import Enqueued, error_of, loopback_settings, start, state
from tests.support.factories import CredentialFactory, create
from workers.engine.runner import Runner

pytestmark = pytest.mark.xdist_group("engine")


@pytest.fixture
async def runner(
    settings: Settings, maker: async_sessionmaker[AsyncSession]
) -> AsyncIterator[Runner]:
    async with guarded_client(["127.0.0.1/32"]) as http:
        yield Runner(loopback_settings(settings), maker, http, "db-node", Enqueued())


@pytest.fixture
async def postgres(
    settings: Settings, maker: async_sessionmaker[AsyncSession], workspace: Workspace
) -> AsyncIterator[str]:
    url = make_url(settings.database_url)
    data = {
        "type": "postgres", "host": url.host or "127.0.0.1", "port": url.port or 5432,
        "database": url.database, "user": url.username, "password": url.password or "",
        "sslmode": "disable",
    }  # fmt: skip
    async with UnitOfWork(maker) as uow:
        credential = await create(
            uow.session, CredentialFactory, workspace_id=workspace.id, data=data
        )
    yield str(credential.id)
    async with UnitOfWork(maker) as uow:
        await uow.session.execute(delete(Credential).where(Credential.id == credential.id))


async def run_sql(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    config: dict[str, Any],
    trigger: dict[str, Any] | None = None,
) -> tuple[str, Any]:
    definition = {
        "nodes": [trig(), {"id": "q", "type": "action", "config": {"kind": "database", **config}}],
        "connections": [{"source": "start", "target": "q"}],
    }
    execution_id = await start(maker, workspace, definition, trigger)
    await runner.execute(execution_id)
    _, nodes = await state(maker, execution_id)
    row = nodes["q"]
    return row.status, row.output if row.status == "completed" else error_of(row)["message"]


async def test_values_travel_as_bind_parameters(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace, postgres: str
) -> None:
    hostile = "x'); DROP TABLE workflows; --"
    status, out = await run_sql(
        runner, maker, workspace,
        {"credential_id": postgres,
         "query": "SELECT %(name)s::text AS name, %(n)s::int + 1 AS next",
         "parameters": {"name": "{{ trigger.name }}", "n": "{{ trigger.n }}"}},
        {"name": hostile, "n": 41},
    )  # fmt: skip
    assert status == "completed", out
    assert out["rows"] == [{"name": hostile, "next": 42}]
    assert out["columns"] == ["name", "next"] and out["truncated"] is False


async def test_read_only_unless_the_node_says_write(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace, postgres: str
) -> None:
    table = f"t_{uuid.uuid4().hex[:8]}"
    status, out = await run_sql(
        runner,
        maker,
        workspace,
        {"credential_id": postgres, "query": f"CREATE TABLE {table} (x int)"},
    )
    assert status == "failed" and "read-only" in out, out
    status, out = await run_sql(
        runner, maker, workspace,
        {"credential_id": postgres, "query": f"CREATE TEMP TABLE {table} (x int)", "write": True},
    )  # fmt: skip
    assert status == "completed", out


async def test_one_statement_and_capped_rows(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace, postgres: str
) -> None:
    status, out = await run_sql(
        runner, maker, workspace, {"credential_id": postgres, "query": "SELECT 1; SELECT 2"}
    )
    assert status == "failed" and "multiple commands" in out.lower(), out
    status, out = await run_sql(
        runner, maker, workspace,
        {"credential_id": postgres, "query": "SELECT g FROM generate_series(1, 50) g",
         "max_rows": 10},
    )  # fmt: skip
    assert status == "completed" and out["row_count"] == 10 and out["truncated"] is True


async def test_the_host_goes_through_the_ssrf_rules(
    settings: Settings,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    postgres: str,
) -> None:
    async with guarded_client([]) as http:
        strict = Runner(settings, maker, http, "db-strict", Enqueued())
        status, out = await run_sql(
            strict, maker, workspace, {"credential_id": postgres, "query": "SELECT 1"}
        )
    assert status == "failed" and "may not reach" in out, out
