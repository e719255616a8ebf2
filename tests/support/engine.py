"""The runner called directly (no broker) on committed data, as a worker runs it: a
stand-in for the enqueue callback, a run started from a definition, and the run's rows
read back."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings, StorageSettings
from backend.kit.db import UnitOfWork
from backend.models import NodeExecution, WorkflowExecution, Workspace
from tests.support.factories import WorkflowExecutionFactory, create, create_workflow
from workers.engine.runner import Runner


def loopback_settings(settings: Settings) -> Settings:
    """Settings for a runner whose nodes call servers the test runs on 127.0.0.1, and
    that notices a cancel within 0.1 s."""
    return settings.model_copy(
        update={
            "http": settings.http.model_copy(update={"allow_private_networks": ["127.0.0.1/32"]}),
            "engine": settings.engine.model_copy(update={"watch_interval_s": 0.1}),
        }
    )


def node_settings(
    settings: Settings, storage: StorageSettings, smtp_port: int | None = None
) -> Settings:
    """loopback_settings, with `storage` and, given a port, mail to the test SMTP server."""
    smtp = settings.smtp
    if smtp_port is not None:
        smtp = smtp.model_copy(
            update={"host": "127.0.0.1", "port": smtp_port, "starttls": False, "timeout_s": 5}
        )
    return loopback_settings(settings).model_copy(update={"storage": storage, "smtp": smtp})


# Makes a committed credential in a workspace from its secret data; its id.
CredentialMaker = Callable[[Workspace, dict[str, object]], Awaitable[uuid.UUID]]


class Enqueued(list[tuple[uuid.UUID, float]]):
    """The runner's enqueue callback, keeping what it was asked to enqueue."""

    def __call__(self, execution_id: uuid.UUID, countdown: float) -> None:
        self.append((execution_id, countdown))


async def start(
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    definition: dict[str, Any],
    trigger: dict[str, Any] | None = None,
) -> uuid.UUID:
    """A committed pending run of a new workflow with `definition`."""
    async with UnitOfWork(maker) as uow:
        wf = await create_workflow(uow.session, workspace.id, definition, name="t")
        ex = await create(
            uow.session,
            WorkflowExecutionFactory,
            workspace_id=workspace.id,
            workflow_id=wf.id,
            trigger_data=trigger or {},
        )
        return ex.id


async def state(
    maker: async_sessionmaker[AsyncSession], execution_id: uuid.UUID
) -> tuple[WorkflowExecution, dict[str, NodeExecution]]:
    async with maker() as session:
        ex = await session.get(WorkflowExecution, execution_id)
        assert ex is not None
        rows = (
            await session.scalars(
                select(NodeExecution).where(NodeExecution.execution_id == execution_id)
            )
        ).all()
        return ex, {r.node_id: r for r in rows}


def error_of(row: WorkflowExecution | NodeExecution) -> dict[str, Any]:
    """The error a failed run or node recorded (failing the test if there is none)."""
    assert row.error is not None, f"no error recorded on {row.id}"
    return row.error


def model_runner(
    runner: Runner, maker: async_sessionmaker[AsyncSession], url: str, name: str
) -> Runner:
    """A runner whose agent nodes talk to the local Messages-API server at `url`."""
    anthropic = runner.settings.anthropic.model_copy(
        update={"api_key": SecretStr("k"), "base_url": url, "max_retries": 0}
    )
    return Runner(
        runner.settings.model_copy(update={"anthropic": anthropic}),
        maker,
        runner.http,
        name,
        Enqueued(),
    )
