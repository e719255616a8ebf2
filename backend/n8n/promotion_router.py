"""/api/v1/n8n/promotions (plan, approve, reject, execute, list, read) and
/api/v1/n8n/deployments (the history per environment)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, status

from backend.auth.dependencies import SettingsDep, WorkspaceAccess, require
from backend.auth.permissions import Permission as P  # noqa: N817 - reads as a table
from backend.kit.db import UnitOfWorkDep
from backend.kit.pagination import Page, PageParamsDep
from backend.models.n8n_promotions import N8nPromotion
from backend.n8n import deployments, promotions
from backend.n8n.promotion_schemas import (
    DeploymentRead,
    PromotionCreate,
    PromotionDecision,
    PromotionRead,
    PromotionStatus,
)
from backend.n8n.repository import paginate

router = APIRouter(prefix="/n8n", tags=["n8n promotions"])


def _on(permission: P) -> WorkspaceAccess:
    result: WorkspaceAccess = require(permission, resource=N8nPromotion, param="promotion_id")
    return result


async def _read(uow: UnitOfWorkDep, promotion: N8nPromotion) -> PromotionRead:
    out = PromotionRead.model_validate(promotion)
    found = await promotions.deployment(uow.session, promotion)
    out.deployment = DeploymentRead.model_validate(found) if found is not None else None
    return out


UPSTREAM: dict[int | str, dict[str, Any]] = {
    502: {"description": "n8n answered with an error, or could not be reached"}
}


@router.post("/promotions", status_code=status.HTTP_201_CREATED, responses=UPSTREAM)
async def create_promotion(
    body: PromotionCreate,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    access: WorkspaceAccess = require(P.WORKFLOWS_WRITE, scope="header"),
) -> PromotionRead:
    """Plan a promotion (nothing is written to n8n): the target workflow to create or
    update (found by lineage, else by our marker, or `target_workflow_id`), credentials
    mapped by name and type (missing ones listed: the plan is `blocked`), the diff against
    the target, the gates, and approval tasks per the target environment's policy."""
    req = promotions.PlanRequest(
        instance_id=body.workflow.instance_id,
        n8n_workflow_id=body.workflow.n8n_workflow_id,
        from_env=body.from_env,
        to_env=body.to_env,
        min_success_rate=body.min_success_rate,
        target_workflow_id=body.target_workflow_id,
        note=body.note,
    )
    return await _read(uow, await promotions.plan(uow, settings, access, req))


@router.get("/promotions")
async def list_promotions(
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    page: PageParamsDep,
    status_: Annotated[PromotionStatus | None, Query(alias="status")] = None,
    environment: Annotated[
        uuid.UUID | None, Query(description="promotions from or into this environment")
    ] = None,
    access: WorkspaceAccess = require(P.WORKFLOWS_READ, scope="header"),
) -> Page[PromotionRead]:
    stmt = promotions.list_query(access.workspace.id, status=status_, environment=environment)
    items, total = await paginate(uow.session, stmt, limit=page.limit, offset=page.offset)
    out = []
    for item in items:
        await promotions.follow_tasks(uow, settings, item)
        out.append(await _read(uow, item))
    return Page(items=out, total=total, limit=page.limit, offset=page.offset)


@router.get("/promotions/{promotion_id}")
async def get_promotion(
    uow: UnitOfWorkDep, settings: SettingsDep, access: WorkspaceAccess = _on(P.WORKFLOWS_READ)
) -> PromotionRead:
    await promotions.follow_tasks(uow, settings, access.resource)
    return await _read(uow, access.resource)


@router.post("/promotions/{promotion_id}/approve")
async def approve_promotion(
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    body: PromotionDecision | None = None,
    access: WorkspaceAccess = _on(P.WORKFLOWS_READ),
) -> PromotionRead:
    """Approve: decides one of the promotion's open approval tasks the caller may decide
    (the same task /tasks shows). 403 when none is the caller's; 409 once decided, or
    when the caller already approved (the policy's approvals are distinct people)."""
    comment = body.comment if body is not None else None
    row = await promotions.decide(uow, settings, access, approve=True, comment=comment)
    return await _read(uow, row)


@router.post("/promotions/{promotion_id}/reject")
async def reject_promotion(
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    body: PromotionDecision | None = None,
    access: WorkspaceAccess = _on(P.WORKFLOWS_READ),
) -> PromotionRead:
    """Reject: one rejection rejects the promotion."""
    comment = body.comment if body is not None else None
    row = await promotions.decide(uow, settings, access, approve=False, comment=comment)
    return await _read(uow, row)


@router.post(
    "/promotions/{promotion_id}/execute",
    responses={502: {"description": "a step failed: the deployment says what was rolled back"}},
)
async def execute_promotion(
    uow: UnitOfWorkDep, settings: SettingsDep, access: WorkspaceAccess = _on(P.WORKFLOWS_WRITE)
) -> PromotionRead:
    """Carry the plan out: snapshot the target, write (credential ids the target's),
    publish when the source is active (or the target was), read back and compare with
    the plan's digest, record the deployment and make it the drift baseline. Any failed
    step puts the target back (502, the deployment says what happened). 409 when a gate
    is closed (approvals, allowed hours, success rate, open drift), credentials are
    missing, the target changed since the plan, or it was executed already."""
    promotion, _ = await deployments.execute(uow, settings, access)
    return await _read(uow, promotion)


@router.get("/deployments")
async def list_deployments(
    uow: UnitOfWorkDep,
    page: PageParamsDep,
    environment: Annotated[uuid.UUID | None, Query(description="an environment's id")] = None,
    lineage_id: Annotated[uuid.UUID | None, Query(description="one workflow's lineage")] = None,
    access: WorkspaceAccess = require(P.WORKFLOWS_READ, scope="header"),
) -> Page[DeploymentRead]:
    """Deployment history, newest first: every executed promotion, deployed or rolled
    back, with its steps."""
    stmt = promotions.deployments_query(
        access.workspace.id, environment=environment, lineage=lineage_id
    )
    items, total = await paginate(uow.session, stmt, limit=page.limit, offset=page.offset)
    return Page(
        items=[DeploymentRead.model_validate(d) for d in items],
        total=total,
        limit=page.limit,
        offset=page.offset,
    )
