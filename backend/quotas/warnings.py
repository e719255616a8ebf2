"""Quota warnings: a workspace's owners and administrators hear (notification kind
`quota.warning`: inbox, live on their channel, e-mail and push as their preferences say)
the first time its use of a counted quota reaches each QUOTAS__WARN_AT_PERCENT threshold
of the limit in a period. A refusal counts as reaching 100.

The admission path pays nothing for this unless a threshold is crossed: whether one is
is arithmetic on the figure the reservation already answered (before < threshold <=
after). A crossing sends one `quotas.warn` task (fire and forget, remembered in the
process so a burst of refusals sends one); the task writes the warning once per
(workspace, quota, period, threshold) under an advisory lock, with the activity-log row
that records it as the proof it was sent: two processes, a redelivered task or a second
crossing after a counter rebuild find that row and tell nobody again.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text

from backend.auth.permissions import Role
from backend.config import Settings
from backend.kit.db import UnitOfWork
from backend.kit.logging import get_logger
from backend.kit.tasks import Send, send_from_loop
from backend.models import ActivityLog, User, WorkspaceMember

log = get_logger(__name__)
KIND = "quota.warning"
ACTION = "quota.warning"
WARN_TASK = "quotas.warn"
LABELS = {
    "runs_per_day": "Runs today",
    "ai_tokens_per_month": "AI tokens this month",
    "ai_cost_per_month_usd": "AI cost this month (USD)",
    "tool_calls_per_hour": "Tool calls this hour",
    "n8n_toggles_per_day": "n8n workflow toggles today",
    "n8n_refreshes_per_day": "n8n instance refreshes today",
}

# What this process already sent, so a burst of refusals sends one task; bounded.
_sent: OrderedDict[str, None] = OrderedDict()
_SENT_MAX = 4096


def crossed(percents: list[int], limit: float, before: float, after: float) -> list[int]:
    """The thresholds (percent of `limit`) that usage passed on its way from `before`
    to `after`. A limit of 0 (the quota switched off) warns of nothing."""
    if limit <= 0 or after <= before:
        return []
    return [p for p in percents if before < limit * p / 100 <= after]


def signal(
    settings: Settings,
    workspace_id: uuid.UUID,
    name: str,
    limit: float,
    before: float,
    after: float,
    period_start: datetime,
    resets_at: datetime,
    used: float | None = None,
) -> None:
    """Called by the reservation with what it already knows; sends a `quotas.warn` per
    threshold crossed that this process has not sent for this period yet. `used`: what
    the notice shows, when not `after` (a refusal reaches 100 without using it up)."""
    for percent in crossed(settings.quotas.warn_at_percent, limit, before, after):
        key = f"{workspace_id}:{name}:{int(period_start.timestamp())}:{percent}"
        if key in _sent:
            continue
        _sent[key] = None
        if len(_sent) > _SENT_MAX:
            _sent.popitem(last=False)
        args = (str(workspace_id), name, percent, period_start.isoformat(),
                resets_at.isoformat(), after if used is None else used, limit)  # fmt: skip
        send_from_loop(
            Send(WARN_TASK, args),
            what={"workspace_id": str(workspace_id), "quota": name, "percent": percent},
        )


def _shown(value: float) -> int | float:
    return int(value) if float(value).is_integer() else round(value, 4)


async def warn(
    uow: UnitOfWork,
    settings: Settings,
    workspace_id: uuid.UUID,
    name: str,
    percent: int,
    period_start: datetime,
    resets_at: datetime,
    used: float,
    limit: float,
) -> list[uuid.UUID]:
    """Tell the workspace's owners and administrators, once per (quota, period,
    threshold); the people notified in the app ([] when it was already sent)."""
    session = uow.session
    key = f"quota-warning:{workspace_id}:{name}:{int(period_start.timestamp())}:{percent}"
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": key}
    )
    already = await session.scalar(
        select(func.count())
        .select_from(ActivityLog)
        .where(
            ActivityLog.workspace_id == workspace_id,
            ActivityLog.action == ACTION,
            # The period's rows only, by the (workspace, created_at) index.
            ActivityLog.created_at >= period_start - timedelta(minutes=5),
            ActivityLog.details["quota"].astext == name,
            ActivityLog.details["percent"].astext == str(percent),
            ActivityLog.details["period_start"].astext == period_start.isoformat(),
        )
    )
    if already:
        return []
    label = LABELS.get(name, name)
    shown_used, shown_limit = _shown(used), _shown(limit)
    reached = "reached its limit" if percent >= 100 else f"is at {percent}% of its limit"
    title = f"Quota {name} {reached}"
    body = (
        f"{label}: {shown_used} of {shown_limit} used. "
        + (
            "Work past the limit is refused (402) "
            if percent >= 100
            else "At the limit, further work counted by this quota is refused (402) "
        )
        + f"until it resets at {resets_at.isoformat()} (UTC)."
    )
    details: dict[str, Any] = {
        "quota": name,
        "percent": percent,
        "used": _shown(used),
        "limit": shown_limit,
        "period_start": period_start.isoformat(),
        "resets_at": resets_at.isoformat(),
    }
    session.add(
        ActivityLog(
            workspace_id=workspace_id,
            action=ACTION,
            resource_type="workspace",
            resource_id=str(workspace_id),
            details=details,
        )
    )
    people = list(
        await session.scalars(
            select(WorkspaceMember.user_id)
            .join(User, User.id == WorkspaceMember.user_id)
            .where(
                WorkspaceMember.workspace_id == workspace_id,
                WorkspaceMember.role.in_([Role.OWNER.value, Role.ADMINISTRATOR.value]),
                User.is_active.is_(True),
            )
            .order_by(WorkspaceMember.user_id)
        )
    )
    # Imported here: the push domain imports the workflows and realtime domains, which
    # the lifecycle (and so this module's callers) must not pull in at import time.
    from backend.push.service import notify

    told = await notify(
        uow,
        settings,
        people,
        kind=KIND,
        title=title,
        body=body,
        data={**details, "workspace_id": str(workspace_id)},
        workspace_id=workspace_id,
        email=lambda _user: (title, body),
    )
    log.info("quotas.warned", workspace_id=str(workspace_id), quota=name, percent=percent,
             people=len(people))  # fmt: skip
    return told
