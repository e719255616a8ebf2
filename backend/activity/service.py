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
    entry = entry_values(
        principal,
        action=action,
        resource_type=resource_type,
        resource_id=resource_id,
        workspace_id=workspace_id,
        user_id=user_id,
        details=details,
    )
    session.add(ActivityLog(**entry))
    announce_entry(session, principal, entry)


def entry_values(
    principal: Principal | None,
    *,
    action: str,
    resource_type: str,
    resource_id: uuid.UUID | str | None = None,
    workspace_id: uuid.UUID | None = None,
    user_id: uuid.UUID | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An entry's columns (all but `id` and `created_at`), for `record` or for a
    statement that writes the entry with the change itself (run admission,
    backend/executions/admission.py); then `announce_entry` once it is written."""
    meta = request_meta.get()
    return {
        "workspace_id": workspace_id,
        # The ids, not the rows: `principal.user` may build an ORM object just for this.
        "user_id": principal.user_id if principal else user_id,
        "api_key_id": principal.api_key.id if principal and principal.api_key else None,
        "action": action,
        "resource_type": resource_type,
        "resource_id": str(resource_id) if resource_id is not None else None,
        "ip": meta.ip,
        "user_agent": meta.user_agent,
        "details": details or {},
    }


def announce_entry(
    session: AsyncSession, principal: Principal | None, entry: dict[str, Any]
) -> None:
    """The live feed's notice of an entry, sent if and only if the session commits."""
    workspace_id = entry["workspace_id"]
    if workspace_id is not None:
        announce(
            session,
            workspace_id,
            {
                "type": entry["action"],
                "workspace_id": str(workspace_id),
                "resource_type": entry["resource_type"],
                "resource_id": entry["resource_id"],
                "actor": str(principal.user_id) if principal else None,
                "data": entry["details"],
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
