"""n8n environments (issue 18): `n8n.drift_due` (beat: one `n8n.drift_check` per
environment whose instance is enabled and whose last check is older than
N8N__DRIFT_INTERVAL_S), `n8n.drift_check` (one environment), and `n8n.nightly_snapshots`
(beat, once a day: a snapshot of every workflow of every enabled instance whose
definition changed since its latest snapshot)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import or_, select

from backend.config import get_settings
from backend.kit.celery_app import celery_app
from backend.kit.db import UnitOfWork
from backend.kit.logging import get_logger
from backend.kit.tasks import Send, send_in_thread
from backend.models import N8nEnvironment, N8nInstance
from backend.n8n import client as n8n
from backend.n8n import drift, snapshot_ops
from workers.tasks.executions import process

log = get_logger(__name__)
DRIFT_CHECK = "n8n.drift_check"


@celery_app.task(name="n8n.drift_due")
def drift_due() -> dict[str, int]:
    p = process()
    settings = get_settings()

    async def run() -> int:
        cutoff = datetime.now(UTC) - timedelta(seconds=settings.n8n.drift_interval_s)
        async with p.sessionmaker() as session:
            ids = (
                await session.scalars(
                    select(N8nEnvironment.id)
                    .join(N8nInstance, N8nInstance.id == N8nEnvironment.instance_id)
                    .where(
                        N8nInstance.enabled.is_(True),
                        or_(
                            N8nEnvironment.drift_checked_at.is_(None),
                            N8nEnvironment.drift_checked_at < cutoff,
                        ),
                    )
                )
            ).all()
        if ids:
            await send_in_thread(*(Send(DRIFT_CHECK, (str(i),)) for i in ids))
        return len(ids)

    return {"sent": p.run(run())}


async def _check(environment_id: uuid.UUID) -> dict[str, Any]:
    p = process()
    settings = get_settings()
    async with UnitOfWork(p.sessionmaker) as uow:
        env = await uow.session.get(N8nEnvironment, environment_id)
        if env is None:
            return {"skipped": "gone"}
        outcome = await drift.check_environment(uow, settings, env)
    if not outcome.ok:
        log.warning("n8n.drift_check_failed", environment_id=str(environment_id),
                    reason=outcome.reason)  # fmt: skip
    return dict(outcome.__dict__)


@celery_app.task(name=DRIFT_CHECK)
def drift_check(environment_id: str) -> dict[str, Any]:
    return process().run(_check(uuid.UUID(environment_id)))


@celery_app.task(name="n8n.nightly_snapshots")
def nightly_snapshots() -> dict[str, int]:
    p = process()
    settings = get_settings()

    async def run() -> dict[str, int]:
        async with p.sessionmaker() as session:
            ids = (
                await session.scalars(select(N8nInstance.id).where(N8nInstance.enabled.is_(True)))
            ).all()
        taken = failed = 0
        for instance_id in ids:
            # One transaction per instance: a failing one keeps the others' snapshots.
            async with UnitOfWork(p.sessionmaker) as uow:
                instance = await uow.session.get(N8nInstance, instance_id)
                if instance is None:
                    continue
                try:
                    taken += await snapshot_ops.nightly_instance(uow.session, settings, instance)
                except n8n.N8nFailure as exc:
                    failed += 1
                    log.warning("n8n.nightly_snapshot_failed", instance_id=str(instance_id),
                                reason=exc.message)  # fmt: skip
        return {"instances": len(ids), "snapshots": taken, "failed": failed}

    return p.run(run())
