"""Periodic maintenance on `low_priority` (beat): execution retention, and purging
expired sign-in codes, invitations and sessions. Deletes go in batches, one
transaction each, so a large backlog never holds locks for long."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings, get_settings
from backend.kit.celery_app import celery_app
from backend.kit.db import UnitOfWork
from backend.kit.logging import get_logger
from workers.tasks.executions import process

log = get_logger(__name__)

# Finished runs only; node rows, events and notifications go with them (ON DELETE
# CASCADE). A workspace's {"retention_days": n} setting overrides the default; anything
# that is not a sane number of days is ignored rather than allowed to break the pass.
RETENTION_BATCH = text(
    """
    DELETE FROM workflow_executions WHERE id IN (
        SELECT e.id FROM workflow_executions e
        JOIN workspaces w ON w.id = e.workspace_id
        WHERE e.status IN ('completed', 'failed', 'cancelled')
          AND coalesce(e.finished_at, e.created_at) < :now - make_interval(days =>
              CASE WHEN (w.settings->>'retention_days') ~ '^[1-9][0-9]{0,3}$'
                   THEN (w.settings->>'retention_days')::int
                   ELSE :default_days END)
        LIMIT :batch
        FOR UPDATE OF e SKIP LOCKED
    )
    """
)

PURGES = {
    # A day past expiry, so a code's row outlives any attempt still in flight.
    "otp_codes": "DELETE FROM otp_codes WHERE id IN (SELECT id FROM otp_codes "
    "WHERE expires_at < :now - interval '1 day' LIMIT :batch)",
    "invitations": "DELETE FROM invitations WHERE id IN (SELECT id FROM invitations "
    "WHERE accepted_at IS NULL AND expires_at < :now LIMIT :batch)",
    "sessions": "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions "
    "WHERE expires_at < :now OR revoked_at < :now - interval '1 day' LIMIT :batch)",
}


async def _batched(
    sessionmaker: async_sessionmaker[AsyncSession], statement: Any, params: dict[str, Any]
) -> int:
    total = 0
    while True:
        async with UnitOfWork(sessionmaker) as uow:
            result = await uow.session.execute(statement, params)
            deleted = int(getattr(result, "rowcount", 0) or 0)
        total += deleted
        if deleted < params["batch"]:
            return total


async def retention_pass(
    sessionmaker: async_sessionmaker[AsyncSession], settings: Settings, now: datetime
) -> int:
    """Delete finished executions older than their workspace's retention; returns how
    many."""
    m = settings.maintenance
    return await _batched(
        sessionmaker,
        RETENTION_BATCH,
        {"now": now, "default_days": m.retention_days, "batch": m.retention_batch},
    )


async def purge_pass(
    sessionmaker: async_sessionmaker[AsyncSession], settings: Settings, now: datetime
) -> dict[str, int]:
    batch = settings.maintenance.retention_batch
    return {
        table: await _batched(sessionmaker, text(sql), {"now": now, "batch": batch})
        for table, sql in PURGES.items()
    }


@celery_app.task(name="maintenance.retention")
def retention() -> dict[str, int]:
    p = process()
    deleted = p.run(retention_pass(p.sessionmaker, get_settings(), datetime.now(UTC)))
    if deleted:
        log.info("maintenance.retention", executions_deleted=deleted)
    return {"executions_deleted": deleted}


@celery_app.task(name="maintenance.purge")
def purge() -> dict[str, int]:
    p = process()
    counts = p.run(purge_pass(p.sessionmaker, get_settings(), datetime.now(UTC)))
    log.info("maintenance.purge", **counts)
    return counts
