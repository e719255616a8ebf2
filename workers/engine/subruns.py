"""Sub-workflow runs: a node (or a loop pass) starts a child run, created by the same
lifecycle code as every other run, and unless told not to wait, runs it in the parent's
own task until it ends. Running it here rather than through the queue means a parent
never waits for a worker slot that other waiting parents hold (a classic pool deadlock).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.executions import lifecycle
from backend.executions import repository as repo
from backend.executions.lifecycle import Claim
from backend.executions.state import TERMINAL_EXECUTION, ExecutionStatus
from backend.kit.db import UnitOfWork
from backend.models import Workflow
from workers.engine.retry import NodeFailure
from workers.nodes.base import NodeContext, SubRun

E = ExecutionStatus
Execute = Callable[[uuid.UUID], Awaitable[str]]


class SubRuns:
    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        enqueue: Callable[[uuid.UUID, float], None],
        execute: Execute,
    ) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.enqueue = enqueue
        self.execute = execute

    async def _start_or_find(
        self,
        claim: Claim,
        node_id: str,
        iteration: int,
        ctx: NodeContext,
        workflow_id: uuid.UUID,
        trigger_data: dict[str, Any],
    ) -> uuid.UUID:
        depth = claim.depth + 1
        limit = self.settings.engine.max_sub_workflow_depth
        if depth > limit:
            raise NodeFailure(f"sub-workflows nest deeper than {limit} levels", "permanent")
        base = f"sub:{claim.id}:{node_id}:{iteration}#"
        async with UnitOfWork(self.sessionmaker) as uow:
            workflow = await uow.session.scalar(
                select(Workflow).where(
                    Workflow.id == workflow_id, Workflow.workspace_id == claim.workspace_id
                )
            )
            if workflow is None:
                raise NodeFailure("sub-workflow not found in this workspace", "permanent")
            if workflow.status == "archived":
                raise NodeFailure("the sub-workflow is archived", "permanent")
            # The idempotency key makes a redelivered parent find its child again
            # instead of starting a second one; a child that failed or was cancelled
            # (the node timed out and is being retried) is followed by a fresh one.
            latest = await repo.latest_child(uow.session, claim.workspace_id, claim.id, base)
            attempt = 0
            if latest is not None:
                attempt = int(str(latest.idempotency_key).rsplit("#", 1)[1])
                if latest.status in (E.FAILED, E.CANCELLED) and ctx.attempt > 1:
                    attempt += 1
            key = f"{base}{attempt}"
            child = await lifecycle.create_run(
                uow,
                workspace_id=claim.workspace_id,
                workflow_id=workflow.id,
                version=workflow.current_version,
                trigger_type="sub_workflow",
                trigger_data=trigger_data,
                actor=claim.token,
                reason=f"sub-workflow of {claim.id} node {node_id}",
                # Waiting parents run the child here; the others enqueue it below.
                enqueue=False,
                skip_duplicate=True,
                idempotency_key=key,
                parent_execution_id=claim.id,
                parent_node_id=node_id,
                depth=depth,
            )
            if child is not None:
                return child.id
            found = await repo.find_by_key(uow.session, claim.workspace_id, key)
            assert found is not None
            return found.id

    async def run(
        self,
        claim: Claim,
        node_id: str,
        iteration: int,
        ctx: NodeContext,
        workflow_id: uuid.UUID,
        trigger_data: dict[str, Any],
        wait: bool,
    ) -> SubRun:
        """Start (or find again, after a crash) the child run of `node_id`, pass
        `iteration`, and unless not waiting, run it here until it ends."""
        child_id = await self._start_or_find(
            claim, node_id, iteration, ctx, workflow_id, trigger_data
        )
        if not wait:
            self.enqueue(child_id, 0.0)
            return SubRun(child_id, E.PENDING)
        try:
            while True:
                async with self.sessionmaker() as session:
                    child = await repo.get_run(session, child_id)
                    assert child is not None
                if child.status in TERMINAL_EXECUTION:
                    ctx.usage[0] += child.input_tokens
                    ctx.usage[1] += child.output_tokens
                    ctx.usage[2] += child.cost_usd
                    return SubRun(child.id, child.status, child.output, child.error)
                # Claims nothing while another worker holds it or a retry wait parks
                # it; then look again shortly.
                if await self.execute(child_id) == "not_claimed":
                    await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            # Cancelled with the parent, at its deadline or at the node's timeout; a
            # parent that lost its lease or broke leaves the child to finish, and finds
            # it again when it resumes.
            if claim.stop not in ("lost", "abandoned"):
                await asyncio.shield(
                    lifecycle.cancel_child(self.sessionmaker, child_id, actor=claim.token)
                )
            raise
