"""/api/v1/workflows/{id}/suggestions: list and read (workflows.read); refresh the
run-history ones now, ask the model for more, accept, dismiss (workflows.write)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from backend.auth.dependencies import LimiterDep, SettingsDep, WorkspaceAccess, require
from backend.auth.permissions import Permission as P  # noqa: N817 - reads as a table
from backend.generate.router import ERRORS as MODEL_ERRORS
from backend.kit.db import UnitOfWorkDep
from backend.kit.pagination import Page, PageParamsDep
from backend.models import Workflow
from backend.suggestions import model, service
from backend.suggestions.schemas import (
    AcceptResult,
    GenerateSuggestions,
    GenerateSuggestionsResult,
    RefreshResult,
    Source,
    Status,
    SuggestionRead,
)

router = APIRouter(prefix="/workflows/{workflow_id}/suggestions", tags=["suggestions"])


def _on(permission: P) -> Any:
    return require(permission, resource=Workflow, param="workflow_id")


ACCEPT_ERRORS: dict[int | str, dict[str, Any]] = {
    409: {"description": "Not open any more, or the workflow moved past its base version"},
    422: {"description": "The patch no longer validates (problems listed)"},
}


@router.get("")
async def list_suggestions(
    uow: UnitOfWorkDep,
    page: PageParamsDep,
    status: Annotated[Status | Literal["all"], Query()] = "open",
    kind: Annotated[str | None, Query(max_length=40)] = None,
    source: Annotated[Source | None, Query()] = None,
    access: WorkspaceAccess = _on(P.WORKFLOWS_READ),
) -> Page[SuggestionRead]:
    """Open suggestions by default (`status=accepted|dismissed|all`), newest
    first, each with what accepting it would change (`diff`, for open ones)."""
    items, total = await service.list_suggestions(
        uow, access, status=None if status == "all" else status, kind=kind, source=source,
        limit=page.limit, offset=page.offset,
    )  # fmt: skip
    return Page(items=items, total=total, limit=page.limit, offset=page.offset)


@router.post("/refresh")
async def refresh_suggestions(
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    access: WorkspaceAccess = _on(P.WORKFLOWS_WRITE),
) -> RefreshResult:
    """Recompute the run-history suggestions now (beat does it every
    GENERATE__SUGGESTIONS_INTERVAL_S)."""
    return await service.refresh(uow, access, settings)


@router.post("/generate", responses=MODEL_ERRORS)
async def generate_suggestions(
    body: GenerateSuggestions,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    limiter: LimiterDep,
    access: WorkspaceAccess = _on(P.WORKFLOWS_WRITE),
) -> GenerateSuggestionsResult:
    """Ask the model for suggestions (it spends money, and counts against the
    workspace's generation rate limit)."""
    return await model.generate(uow, settings, limiter, access, body)


@router.get("/{suggestion_id}")
async def get_suggestion(
    suggestion_id: uuid.UUID,
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = _on(P.WORKFLOWS_READ),
) -> SuggestionRead:
    return await service.get(uow, access, suggestion_id)


@router.post("/{suggestion_id}/accept", responses=ACCEPT_ERRORS)
async def accept_suggestion(
    suggestion_id: uuid.UUID,
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = _on(P.WORKFLOWS_WRITE),
) -> AcceptResult:
    """Apply the patch to the version it was made for, as a new version (validated; 409
    when the workflow moved on meanwhile)."""
    return await service.accept(uow, access, suggestion_id)


@router.post("/{suggestion_id}/dismiss", responses={409: {"description": "Not open any more"}})
async def dismiss_suggestion(
    suggestion_id: uuid.UUID,
    uow: UnitOfWorkDep,
    access: WorkspaceAccess = _on(P.WORKFLOWS_WRITE),
) -> SuggestionRead:
    """Hide it; a recompute does not bring it back."""
    return await service.dismiss(uow, access, suggestion_id)
