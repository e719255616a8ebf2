"""GET /api/v1/workspaces/{workspace_id}/usage (workspace.read): usage against each
quota. Limits are set by operators (`python -m backend.quotas`), not through the API;
a workspace's administrators may only lower the n8n quotas for themselves (its settings'
`quotas`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from backend.auth.dependencies import SettingsDep, WorkspaceAccess, require
from backend.auth.permissions import Permission
from backend.kit.db import SessionDep
from backend.quotas import service
from backend.quotas.schemas import WorkspaceUsage

router = APIRouter(prefix="/workspaces", tags=["workspaces"])


@router.get("/{workspace_id}/usage", response_model=WorkspaceUsage)
async def workspace_usage(
    session: SessionDep,
    settings: SettingsDep,
    access: WorkspaceAccess = require(Permission.WORKSPACE_READ),
) -> dict[str, Any]:
    """Each quota's limit (null: unlimited), what is used, what remains, and when it
    resets (UTC calendar hour, day or month)."""
    ws = access.workspace.id
    quotas = await service.usage(session, ws, settings, access.workspace.settings)
    return {"workspace_id": str(ws), "quotas": quotas}
