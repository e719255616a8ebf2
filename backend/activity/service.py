"""Writing and reading the activity log. Services call `record` for every change they
make, in the same transaction, so the trail and the change commit or vanish together."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.dependencies import Principal
from backend.kit.middleware import request_meta
from backend.kit.repository import Repository
from backend.models import ActivityLog
from backend.realtime.events import announce


class ActivityRepository(Repository[ActivityLog]):
    model = ActivityLog


def record(
    session: AsyncSession,
    principal: Principal | None,
    *,
    action: str,
    resource_type: str,
    resource_id: uuid.UUID | str | None = None,
    workspace_id: uuid.UUID | None = None,
    user_id: uuid.UUID | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    meta = request_meta.get()
    session.add(
        ActivityLog(
            workspace_id=workspace_id,
            user_id=principal.user.id if principal else user_id,
            api_key_id=principal.api_key.id if principal and principal.api_key else None,
            action=action,
            resource_type=resource_type,
            resource_id=str(resource_id) if resource_id is not None else None,
            ip=meta.ip,
            user_agent=meta.user_agent,
            details=details or {},
        )
    )
    if workspace_id is not None:
        announce(
            session,
            workspace_id,
            {
                "type": action,
                "workspace_id": str(workspace_id),
                "resource_type": resource_type,
                "resource_id": str(resource_id) if resource_id is not None else None,
                "actor": str(principal.user.id) if principal else None,
                "data": details or {},
            },
        )


async def list_for_workspace(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    *,
    limit: int,
    offset: int,
    action: str | None = None,
    resource_type: str | None = None,
    user_id: uuid.UUID | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> tuple[Sequence[ActivityLog], int]:
    stmt = select(ActivityLog).where(ActivityLog.workspace_id == workspace_id)
    if action:
        # "members." matches every members action; an exact name matches itself.
        stmt = stmt.where(
            ActivityLog.action.startswith(action)
            if action.endswith(".")
            else ActivityLog.action == action
        )
    if resource_type:
        stmt = stmt.where(ActivityLog.resource_type == resource_type)
    if user_id:
        stmt = stmt.where(ActivityLog.user_id == user_id)
    if since:
        stmt = stmt.where(ActivityLog.created_at >= since)
    if until:
        stmt = stmt.where(ActivityLog.created_at < until)
    stmt = stmt.order_by(ActivityLog.created_at.desc(), ActivityLog.id.desc())
    return await ActivityRepository(session).paginate(stmt, limit=limit, offset=offset)
