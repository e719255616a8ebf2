"""Maintenance passes: retention deletes old finished runs (with their node rows) per
the workspace's setting and nothing else; expired codes, invitations and sessions go."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.models import (
    AuthSession,
    Invitation,
    NodeExecution,
    OtpCode,
    Workflow,
    WorkflowExecution,
    Workspace,
)
from tests.support.factories import make_workflow
from tests.support.identity import make_user, make_workspace
from workers.tasks.maintenance import purge_pass, retention_pass

NOW = datetime.now(UTC)


async def run(
    session: AsyncSession, workflow: Workflow, *, days_ago: float, status: str = "completed"
) -> uuid.UUID:
    at = NOW - timedelta(days=days_ago)
    execution = WorkflowExecution(
        workspace_id=workflow.workspace_id, workflow_id=workflow.id, version=1,
        trigger_type="manual", status=status, created_at=at,
        finished_at=at if status in ("completed", "failed", "cancelled") else None,
    )  # fmt: skip
    session.add(execution)
    await session.flush()
    session.add(NodeExecution(execution_id=execution.id, node_id="shape", status="completed"))
    await session.flush()
    return execution.id


async def test_retention_deletes_old_finished_runs_and_nothing_else(
    session: AsyncSession, sessionmaker: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    default_ws = await make_workspace(session)
    long_ws = await make_workspace(session)
    long_ws.settings = {"retention_days": 90}
    odd_ws = await make_workspace(session)
    odd_ws.settings = {"retention_days": "forever; DROP TABLE x"}
    await session.flush()
    wf = await make_workflow(session, default_ws)
    long_wf = await make_workflow(session, long_ws)
    odd_wf = await make_workflow(session, odd_ws)

    old = [await run(session, wf, days_ago=31 + i, status=s) for i, s in
           enumerate(["completed", "failed", "cancelled", "completed", "completed"])]  # fmt: skip
    kept = [
        await run(session, wf, days_ago=29),
        await run(session, wf, days_ago=45, status="running"),
        await run(session, wf, days_ago=45, status="pending"),
        await run(session, long_wf, days_ago=60),
    ]
    old.append(await run(session, long_wf, days_ago=91))
    old.append(await run(session, odd_wf, days_ago=31))  # a junk setting means the default

    # Small batches, so the pass has to loop.
    small = settings.model_copy(
        update={"maintenance": settings.maintenance.model_copy(update={"retention_batch": 2})}
    )
    deleted = await retention_pass(sessionmaker, small, NOW)
    mine = [default_ws.id, long_ws.id, odd_ws.id]
    left = set(
        (
            await session.scalars(
                select(WorkflowExecution.id).where(WorkflowExecution.workspace_id.in_(mine))
            )
        ).all()
    )
    assert left == set(kept)
    assert deleted >= len(old)
    orphans = await session.scalars(
        select(NodeExecution.id).where(NodeExecution.execution_id.in_(old))
    )
    assert orphans.all() == []
    assert await session.get(Workspace, default_ws.id) is not None


async def test_purge_removes_expired_codes_invitations_and_sessions(
    session: AsyncSession, sessionmaker: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    user = await make_user(session)
    workspace = await make_workspace(session)
    tag = uuid.uuid4().hex[:8]
    day = timedelta(days=1)

    def otp(expires_at: datetime) -> OtpCode:
        return OtpCode(
            email=f"{tag}@x.org", purpose="login", code_hash=uuid.uuid4().hex, expires_at=expires_at
        )

    def invitation(expires_at: datetime, accepted_at: datetime | None = None) -> Invitation:
        return Invitation(
            workspace_id=workspace.id, email=f"{uuid.uuid4().hex[:6]}@x.org", role="viewer",
            token_hash=uuid.uuid4().hex, expires_at=expires_at, accepted_at=accepted_at,
        )  # fmt: skip

    def auth_session(expires_at: datetime, revoked_at: datetime | None = None) -> AuthSession:
        return AuthSession(
            user_id=user.id, refresh_token_hash="", expires_at=expires_at, revoked_at=revoked_at
        )

    otp_old, otp_live = otp(NOW - 2 * day), otp(NOW + timedelta(minutes=5))
    inv_old, inv_live = invitation(NOW - day), invitation(NOW + day)
    inv_taken = invitation(NOW - day, accepted_at=NOW - 3 * day)
    s_old, s_live = auth_session(NOW - timedelta(hours=1)), auth_session(NOW + 3 * day)
    s_revoked = auth_session(NOW + 3 * day, revoked_at=NOW - 2 * day)
    rows = [otp_old, otp_live, inv_old, inv_taken, inv_live, s_old, s_revoked, s_live]
    session.add_all(rows)
    await session.flush()
    counts = await purge_pass(sessionmaker, settings, NOW)
    assert counts["otp_codes"] >= 1 and counts["invitations"] >= 1 and counts["sessions"] >= 2
    gone = {otp_old.id, inv_old.id, s_old.id, s_revoked.id}
    for row in rows:
        still = await session.scalar(select(type(row).id).where(type(row).id == row.id))
        assert (still is None) == (row.id in gone), row
