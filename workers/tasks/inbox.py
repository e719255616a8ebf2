"""People in the loop (issue 16), on the `default` queue:

- `notifications.push`: one notice to the devices of some people (Web Push, FCM), sent
  after the commit that created it; subscriptions the push service calls gone are
  deleted. Not retried: a push is a nudge, the notice itself is in the inbox.
- `notifications.expire_tasks` (beat, every TASKS__EXPIRE_INTERVAL_S): open tasks past
  their deadline expire (`on_timeout` decides) and their parked runs wake to take that
  branch. A parked approval step also expires its own task when its run comes due, so
  this is the backstop and the only expiry of manual tasks.
- `quotas.warn`: a workspace's use of a quota crossed a warning threshold; its owners
  and administrators are told once per threshold and period (backend/quotas/warnings).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from backend.config import get_settings
from backend.inbox.service import expire_due
from backend.kit.celery_app import celery_app
from backend.kit.db import UnitOfWork
from backend.kit.logging import get_logger
from backend.push.service import deliver_pushes
from backend.quotas import warnings
from workers.tasks.executions import process

log = get_logger(__name__)


@celery_app.task(name="notifications.push", ignore_result=True)
def push(targets: list[str], message: dict[str, Any]) -> dict[str, int]:
    p = process()
    text = {str(k): str(v) for k, v in message.items()}
    counts = p.run(deliver_pushes(p.sessionmaker, get_settings(), targets, text, p.http))
    log.info("push.sent", **counts)
    return counts


@celery_app.task(name="notifications.expire_tasks")
def expire_tasks() -> int:
    p = process()
    expired = p.run(expire_due(p.sessionmaker))
    if expired:
        log.info("tasks.expired", count=expired)
    return expired


@celery_app.task(name=warnings.WARN_TASK, ignore_result=True)
def quota_warning(
    workspace_id: str, name: str, percent: int, period_start: str, resets_at: str,
    used: float, limit: float,
) -> int:  # fmt: skip
    p = process()

    async def run() -> int:
        async with UnitOfWork(p.sessionmaker) as uow:
            told = await warnings.warn(
                uow, get_settings(), uuid.UUID(workspace_id), name, int(percent),
                datetime.fromisoformat(period_start), datetime.fromisoformat(resets_at),
                float(used), float(limit),
            )  # fmt: skip
        return len(told)

    return p.run(run())
