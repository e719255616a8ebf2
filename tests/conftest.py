"""Test wiring: every xdist worker gets its own database (built by running the
migrations) and its own Redis database number, on the servers `make test` started
(or the ones DATABASE_URL / REDIS_URL name). Each DB test runs inside a transaction
that is rolled back; cross-process tests use the worker's database for real."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

if not os.environ.get("DATABASE_URL") or not os.environ.get("REDIS_URL"):
    raise pytest.UsageError(
        "Tests need PostgreSQL and Redis: run `make test`, which starts throwaway ones, "
        "or set DATABASE_URL and REDIS_URL."
    )

WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
WORKER_NUMBER = int(WORKER.removeprefix("gw") or 0)
# The URLs we were given, kept aside: xdist workers inherit the environment of the
# controller after this module rewrote DATABASE_URL / REDIS_URL below.
ADMIN_DATABASE_URL = os.environ.setdefault(
    "ORCH_TEST_ADMIN_DATABASE_URL", os.environ["DATABASE_URL"]
)
BASE_REDIS_URL = os.environ.setdefault("ORCH_TEST_BASE_REDIS_URL", os.environ["REDIS_URL"])
TEST_DATABASE = f"orch_test_{WORKER}"

# Must happen before anything imports backend: the Celery app and settings read the
# environment once.
from tests.support.databases import with_database  # noqa: E402

os.environ["DATABASE_URL"] = with_database(ADMIN_DATABASE_URL, TEST_DATABASE)
os.environ["REDIS_URL"] = BASE_REDIS_URL.rsplit("/", 1)[0] + f"/{WORKER_NUMBER + 1}"
os.environ["ENVIRONMENT"] = "test"
os.environ.setdefault("LOG__LEVEL", "INFO")

import httpx  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from sqlalchemy.ext.asyncio import (  # noqa: E402
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
)

from backend.auth.permissions import Role  # noqa: E402
from backend.config import Settings, get_settings  # noqa: E402
from backend.kit.db import UnitOfWork, create_engine  # noqa: E402
from backend.models import Workspace  # noqa: E402
from tests.support.asgi import client_for  # noqa: E402
from tests.support.crossprocess import api, owner, uvicorn_api  # noqa: E402, F401  (fixtures)
from tests.support.databases import drop_database, migrate, recreate_database  # noqa: E402
from tests.support.factories import WorkspaceFactory, create  # noqa: E402
from tests.support.identity import Actor, member  # noqa: E402
from tests.support.mail import Mailbox, start_smtp  # noqa: E402
from tests.support.procs import PYTHON, STARTUP_S, free_port, python_env, running, wait_for  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def database() -> Iterator[str]:
    """This worker's database, freshly built by the migrations."""
    recreate_database(ADMIN_DATABASE_URL, TEST_DATABASE)
    migrate(os.environ["DATABASE_URL"])
    yield os.environ["DATABASE_URL"]
    drop_database(ADMIN_DATABASE_URL, TEST_DATABASE)


@pytest.fixture(scope="session")
def admin_database_url() -> str:
    return ADMIN_DATABASE_URL


@pytest.fixture(scope="session")
def settings() -> Settings:
    return get_settings()


@pytest.fixture(scope="session")
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings)
    yield engine
    await engine.dispose()


@pytest.fixture
async def connection(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection inside a transaction that is rolled back after the test."""
    async with engine.connect() as conn:
        outer = await conn.begin()
        yield conn
        await outer.rollback()


@pytest.fixture
def sessionmaker(connection: AsyncConnection) -> async_sessionmaker[AsyncSession]:
    # Commits inside the code under test become savepoint releases on the outer
    # transaction, so the test sees them and the rollback still discards them.
    return async_sessionmaker(
        bind=connection,
        expire_on_commit=False,
        autoflush=False,
        join_transaction_mode="create_savepoint",
    )


@pytest.fixture
async def session(sessionmaker: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    async with sessionmaker() as s:
        yield s


@pytest.fixture
def maker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions on committed data, for code that opens its own transactions as a worker
    does (the runner, the lifecycle); what it commits stays."""
    return async_sessionmaker(engine, expire_on_commit=False)


@pytest.fixture
async def workspace(maker: async_sessionmaker[AsyncSession]) -> Workspace:
    """A committed workspace (see `maker`)."""
    async with UnitOfWork(maker) as uow:
        return await create(uow.session, WorkspaceFactory, name="Engine")


@pytest.fixture
async def team(session: AsyncSession) -> Workspace:
    """A workspace in the test's rolled-back transaction."""
    return await create(session, WorkspaceFactory)


@pytest.fixture
async def editor(session: AsyncSession, settings: Settings, team: Workspace) -> Actor:
    """A signed-in editor of `team`, its headers naming the workspace."""
    actor = await member(session, settings, team, Role.EDITOR)
    actor.headers["X-Workspace-ID"] = str(team.id)
    return actor


@pytest.fixture(scope="session")
def app(settings: Settings) -> FastAPI:
    """One app for the session: each client runs its lifespan again (fresh engine,
    Redis clients and hub; `app.state` set anew), but the app itself is built once.
    FastAPI (0.16x) resolves an app's routes lazily, on its first requests; measured,
    that was ~60 % of a permission-matrix test (~65 ms of ~100 ms) when every test
    built its own app. Tests that need other settings build their own with create_app."""
    from backend.main import create_app

    return create_app(settings)


@pytest.fixture
async def client(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession]
) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client whose requests share the test's rolled-back transaction."""
    async for c in client_for(app, sessionmaker):
        yield c


# Cross-process fixtures: one SMTP server and one real Celery worker per xdist worker,
# shared by every test of an xdist group ("crossprocess", "crossprocess-b") so a group's
# modules land on one xdist worker and start them once. Two groups of about equal time
# (measured with --junitxml): one group was ~750 s of test time on one xdist worker, the
# floor of the whole run; a second group costs one more Celery worker (when its modules
# land on the other xdist worker).


@pytest.fixture(scope="session")
def crossprocess_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("crossprocess")


@pytest.fixture(scope="session")
def smtp_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def mailbox(smtp_port: int) -> Iterator[Mailbox]:
    controller, box = start_smtp(smtp_port)
    yield box
    controller.stop()


@pytest.fixture(scope="session")
def anthropic_api() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """The local Messages-API server the cross-process worker's agent nodes talk to."""
    from tests.support.fake_anthropic import fake_anthropic

    with fake_anthropic() as server:
        yield server


@pytest.fixture(scope="session")
def worker_name(
    database: str,
    mailbox: Mailbox,
    smtp_port: int,
    crossprocess_logs: Path,
    anthropic_api: tuple[str, list[dict[str, Any]]],
) -> Iterator[str]:
    """A real Celery worker on this test worker's Redis database, delivering mail to
    the test SMTP server, calling the local Messages API, keeping files in a temporary
    directory."""
    from backend.kit.celery_app import celery_app

    name = f"test-{uuid.uuid4().hex[:8]}@127.0.0.1"
    log = crossprocess_logs / "worker.log"
    argv = [PYTHON, "-m", "celery", "-A", "workers", "worker", "--loglevel=INFO",
            "--queues=high_priority,default,low_priority", "--concurrency=1",
            f"--hostname={name}", "--without-mingle", "--without-gossip"]  # fmt: skip
    env = python_env(
        SMTP__HOST="127.0.0.1",
        SMTP__PORT=str(smtp_port),
        SMTP__STARTTLS="false",
        # Workflows in these tests call HTTP targets the tests run on loopback.
        HTTP__ALLOW_PRIVATE_NETWORKS='["127.0.0.1/32"]',
        ENGINE__WATCH_INTERVAL_S="0.1",
        # Fewer run slots than a batch message claims at once (workers/tasks/executions.py
        # CLAIMS_AT_ONCE): tests/executions/test_batch.py then takes the path where a
        # message claims only as many runs as there are free slots.
        ENGINE__RUNS_PER_PROCESS="8",
        ANTHROPIC__BASE_URL=anthropic_api[0],
        ANTHROPIC__API_KEY="test-key",
        ANTHROPIC__MAX_RETRIES="0",
        STORAGE__LOCAL_ROOT=str(crossprocess_logs / "files"),
    )
    with running(argv, env=env, log=log) as proc:
        wait_for(
            lambda: bool(celery_app.control.ping(destination=[name], timeout=0.5)),
            timeout_s=STARTUP_S, what="celery worker", proc=proc, log=log,
        )  # fmt: skip
        yield name
