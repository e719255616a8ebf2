"""Environments (an n8n instance with a stage and policies) and pipelines (environments
in promotion order), and the policy checks other parts call: `guard_direct_change` (a
protected environment takes no direct toggles or edits through us), `check_hours` (its
allowed-hours window), `may_approve` (who may approve a promotion into it)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.activity.service import record
from backend.auth.dependencies import WorkspaceAccess
from backend.auth.permissions import Role
from backend.kit.db import UnitOfWork
from backend.kit.errors import Conflict, NotFound, PermissionDenied, ValidationFailed
from backend.models import (
    N8nDriftIncident,
    N8nEnvironment,
    N8nInstance,
    N8nPipeline,
    WorkspaceMember,
)
from backend.n8n.env_schemas import (
    EnvironmentCreate,
    EnvironmentPatch,
    EnvironmentRead,
    PipelineCreate,
    PipelinePatch,
    PipelineRead,
    PipelineStage,
)

UNRESOLVED = ("open", "acknowledged")


class EnvironmentProtected(Conflict):
    """A direct change to a protected environment: changes arrive by promotion."""

    code = "environment_protected"


class OutsideAllowedHours(Conflict):
    code = "outside_allowed_hours"


# Policy checks ----------------------------------------------------------------------------


async def environment_of_instance(
    session: AsyncSession, instance_id: uuid.UUID
) -> N8nEnvironment | None:
    env: N8nEnvironment | None = await session.scalar(
        select(N8nEnvironment).where(N8nEnvironment.instance_id == instance_id)
    )
    return env


async def guard_direct_change(session: AsyncSession, instance_id: uuid.UUID, what: str) -> None:
    """Refuse (409 environment_protected) a direct change (`what`: "toggle", ...) to a
    workflow of a protected environment's instance."""
    env = await environment_of_instance(session, instance_id)
    if env is not None and env.protected:
        raise EnvironmentProtected(
            f"the {env.stage!r} environment is protected: no direct {what} through Orchestration "
            "Studio; promote the change from an earlier environment, or unprotect it",
            environment_id=str(env.id),
            stage=env.stage,
        )


def require_admin_for_protected(env: N8nEnvironment | None, role: Role, what: str) -> None:
    """Restores and drift reverts on a protected environment take an administrator:
    they overwrite what a promotion put there."""
    if env is not None and env.protected and not role.at_least(Role.ADMINISTRATOR):
        raise PermissionDenied(
            f"{what} on the protected {env.stage!r} environment takes an administrator or owner",
            environment_id=str(env.id),
        )


def within_hours(env: N8nEnvironment, now: datetime | None = None) -> bool:
    window = env.allowed_hours or {}
    if not window:
        return True
    local = (now or datetime.now(UTC)).astimezone(ZoneInfo(window["timezone"]))
    start = time.fromisoformat(window["start"])
    end = time.fromisoformat(window["end"])
    days = set(window.get("days") or range(7))
    clock = local.time().replace(tzinfo=None)
    if start < end:
        return local.weekday() in days and start <= clock < end
    # Across midnight: the part after midnight belongs to the day the window opened.
    if clock >= start:
        return local.weekday() in days
    if clock < end:
        return (local.weekday() - 1) % 7 in days
    return False


def check_hours(env: N8nEnvironment, now: datetime | None = None) -> None:
    if not within_hours(env, now):
        w = env.allowed_hours
        raise OutsideAllowedHours(
            f"changes to the {env.stage!r} environment are allowed {w['start']}-{w['end']} "
            f"({w['timezone']}) on days {w.get('days')} (0 = Monday)",
            environment_id=str(env.id),
            allowed_hours=w,
        )


def may_approve(env: N8nEnvironment, user_id: uuid.UUID, role: Role) -> bool:
    """Whether this person's approval counts for a promotion into `env`."""
    policy = env.approvals or {}
    ids = {str(i) for i in policy.get("approver_ids") or []}
    min_role = policy.get("approver_min_role")
    if not ids and not min_role:
        return role.at_least(Role.ADMINISTRATOR)
    if str(user_id) in ids:
        return True
    return isinstance(min_role, str) and role.at_least(Role(min_role))


def approvals_needed(env: N8nEnvironment) -> int:
    return int((env.approvals or {}).get("min_approvals") or 0)


# Environments -----------------------------------------------------------------------------


async def _instance_in(
    session: AsyncSession, workspace_id: uuid.UUID, instance_id: uuid.UUID
) -> N8nInstance:
    instance = await session.get(N8nInstance, instance_id)
    if instance is None or instance.workspace_id != workspace_id:
        raise NotFound("n8n instance not found", field="instance_id")
    return instance


async def _check_approvers(
    session: AsyncSession, workspace_id: uuid.UUID, approvals: dict[str, Any]
) -> None:
    ids = [uuid.UUID(str(i)) for i in approvals.get("approver_ids") or []]
    if not ids:
        return
    found = set(
        (
            await session.scalars(
                select(WorkspaceMember.user_id).where(
                    WorkspaceMember.workspace_id == workspace_id, WorkspaceMember.user_id.in_(ids)
                )
            )
        ).all()
    )
    for i, user_id in enumerate(ids):
        if user_id not in found:
            raise ValidationFailed(
                f"{user_id} is not a member of this workspace",
                field=f"approvals.approver_ids[{i}]",
            )


async def read(session: AsyncSession, env: N8nEnvironment) -> EnvironmentRead:
    out = EnvironmentRead.model_validate(env)
    instance = await session.get(N8nInstance, env.instance_id)
    out.instance_name = instance.name if instance else ""
    out.open_incidents = int(
        await session.scalar(
            select(func.count()).where(
                N8nDriftIncident.environment_id == env.id, N8nDriftIncident.status.in_(UNRESOLVED)
            )
        )
        or 0
    )
    return out


async def create(
    uow: UnitOfWork, access: WorkspaceAccess, data: EnvironmentCreate
) -> N8nEnvironment:
    session = uow.session
    instance = await _instance_in(session, access.workspace.id, data.instance_id)
    if await environment_of_instance(session, instance.id) is not None:
        raise Conflict("this instance is already an environment", field="instance_id")
    approvals = data.approvals.model_dump(mode="json")
    await _check_approvers(session, access.workspace.id, approvals)
    env = N8nEnvironment(
        id=uuid.uuid4(),
        workspace_id=access.workspace.id,
        instance_id=instance.id,
        stage=data.stage,
        protected=data.protected,
        approvals=approvals,
        allowed_hours=data.allowed_hours.model_dump(mode="json") if data.allowed_hours else {},
        drift_policy=data.drift_policy,
        created_by=access.user.id,
    )
    session.add(env)
    await session.flush()
    record(session, access.principal, workspace_id=access.workspace.id,
           action="n8n.environment.create", resource_type="n8n_environment",
           resource_id=env.id, details={"instance_id": str(instance.id), "stage": env.stage,
                                         "protected": env.protected})  # fmt: skip
    return env


async def update(
    uow: UnitOfWork, access: WorkspaceAccess, data: EnvironmentPatch
) -> N8nEnvironment:
    env: N8nEnvironment = access.resource
    given = data.model_dump(exclude_unset=True)
    for name in ("stage", "protected", "approvals", "drift_policy"):
        if name in given and given[name] is None:
            raise ValidationFailed(f"{name} cannot be null", field=name)
    if "stage" in given:
        env.stage = given["stage"]
    if "protected" in given:
        env.protected = given["protected"]
    if data.approvals is not None:
        approvals = data.approvals.model_dump(mode="json")
        await _check_approvers(uow.session, env.workspace_id, approvals)
        env.approvals = approvals
    if "allowed_hours" in given:
        env.allowed_hours = data.allowed_hours.model_dump(mode="json") if data.allowed_hours else {}
    if "drift_policy" in given:
        env.drift_policy = given["drift_policy"]
    await uow.session.flush()
    record(uow.session, access.principal, workspace_id=env.workspace_id,
           action="n8n.environment.update", resource_type="n8n_environment",
           resource_id=env.id, details={"fields": sorted(given)})  # fmt: skip
    return env


async def leave_pipelines(
    session: AsyncSession, access: WorkspaceAccess, env: N8nEnvironment
) -> None:
    """Take an environment that is going (deleted, or its instance is) out of every
    pipeline; a pipeline left with none goes too (one cannot be created or saved
    empty). Both logged."""
    for pipeline in (
        await session.scalars(
            select(N8nPipeline).where(N8nPipeline.workspace_id == env.workspace_id)
        )
    ).all():
        if str(env.id) in pipeline.environment_ids:
            pipeline.environment_ids = [i for i in pipeline.environment_ids if i != str(env.id)]
            if not pipeline.environment_ids:
                details = {"name": pipeline.name, "reason": "its last environment was deleted"}
                record(session, access.principal, workspace_id=pipeline.workspace_id,
                       action="n8n.pipeline.delete", resource_type="n8n_pipeline",
                       resource_id=pipeline.id, details=details)  # fmt: skip
                await session.delete(pipeline)


async def delete(uow: UnitOfWork, access: WorkspaceAccess) -> None:
    """Forget the environment (its incidents go; snapshots and baselines stay with the
    instance) and take it out of every pipeline (leave_pipelines)."""
    env: N8nEnvironment = access.resource
    session = uow.session
    await leave_pipelines(session, access, env)
    record(session, access.principal, workspace_id=env.workspace_id,
           action="n8n.environment.delete", resource_type="n8n_environment",
           resource_id=env.id, details={"stage": env.stage})  # fmt: skip
    await session.delete(env)
    await session.flush()


async def list_environments(
    session: AsyncSession, workspace_id: uuid.UUID, *, stage: str | None
) -> Sequence[N8nEnvironment]:
    stmt = select(N8nEnvironment).where(N8nEnvironment.workspace_id == workspace_id)
    if stage:
        stmt = stmt.where(N8nEnvironment.stage == stage)
    return (
        await session.scalars(stmt.order_by(N8nEnvironment.created_at, N8nEnvironment.id))
    ).all()


# Pipelines --------------------------------------------------------------------------------


async def _check_stages(
    session: AsyncSession, workspace_id: uuid.UUID, ids: list[uuid.UUID]
) -> list[str]:
    seen: set[uuid.UUID] = set()
    for i, env_id in enumerate(ids):
        if env_id in seen:
            raise ValidationFailed(
                "an environment appears twice in the pipeline", field=f"environment_ids[{i}]"
            )
        seen.add(env_id)
        env = await session.get(N8nEnvironment, env_id)
        if env is None or env.workspace_id != workspace_id:
            raise NotFound("n8n environment not found", field=f"environment_ids[{i}]")
    return [str(i) for i in ids]


async def _pipeline_name_free(
    session: AsyncSession, workspace_id: uuid.UUID, name: str, me: uuid.UUID | None
) -> None:
    clash = await session.scalar(
        select(N8nPipeline.id).where(
            N8nPipeline.workspace_id == workspace_id, N8nPipeline.name == name
        )
    )
    if clash is not None and clash != me:
        raise Conflict(f"a pipeline named {name!r} exists", field="name")


async def pipeline_read(session: AsyncSession, pipeline: N8nPipeline) -> PipelineRead:
    stages: list[PipelineStage] = []
    for raw in pipeline.environment_ids:
        env = await session.get(N8nEnvironment, uuid.UUID(raw))
        if env is None:
            continue
        instance = await session.get(N8nInstance, env.instance_id)
        stages.append(
            PipelineStage(environment_id=env.id, stage=env.stage, instance_id=env.instance_id,
                          instance_name=instance.name if instance else "", protected=env.protected)
        )  # fmt: skip
    return PipelineRead(
        id=pipeline.id,
        workspace_id=pipeline.workspace_id,
        name=pipeline.name,
        description=pipeline.description,
        environment_ids=[s.environment_id for s in stages],
        stages=stages,
        created_by=pipeline.created_by,
        created_at=pipeline.created_at,
        updated_at=pipeline.updated_at,
    )


async def create_pipeline(
    uow: UnitOfWork, access: WorkspaceAccess, data: PipelineCreate
) -> N8nPipeline:
    session = uow.session
    await _pipeline_name_free(session, access.workspace.id, data.name, None)
    pipeline = N8nPipeline(
        id=uuid.uuid4(),
        workspace_id=access.workspace.id,
        name=data.name,
        description=data.description,
        environment_ids=await _check_stages(session, access.workspace.id, data.environment_ids),
        created_by=access.user.id,
    )
    session.add(pipeline)
    await session.flush()
    record(session, access.principal, workspace_id=access.workspace.id,
           action="n8n.pipeline.create", resource_type="n8n_pipeline", resource_id=pipeline.id,
           details={"name": pipeline.name,
                    "environment_ids": pipeline.environment_ids})  # fmt: skip
    return pipeline


async def update_pipeline(
    uow: UnitOfWork, access: WorkspaceAccess, data: PipelinePatch
) -> N8nPipeline:
    pipeline: N8nPipeline = access.resource
    session = uow.session
    given = data.model_dump(exclude_unset=True)
    for name in ("name", "description", "environment_ids"):
        if name in given and given[name] is None:
            raise ValidationFailed(f"{name} cannot be null", field=name)
    if data.name is not None and data.name != pipeline.name:
        await _pipeline_name_free(session, pipeline.workspace_id, data.name, pipeline.id)
        pipeline.name = data.name
    if data.description is not None:
        pipeline.description = data.description
    if data.environment_ids is not None:
        pipeline.environment_ids = await _check_stages(
            session, pipeline.workspace_id, data.environment_ids
        )
    await session.flush()
    record(session, access.principal, workspace_id=pipeline.workspace_id,
           action="n8n.pipeline.update", resource_type="n8n_pipeline", resource_id=pipeline.id,
           details={"fields": sorted(given)})  # fmt: skip
    return pipeline


async def delete_pipeline(uow: UnitOfWork, access: WorkspaceAccess) -> None:
    pipeline: N8nPipeline = access.resource
    record(uow.session, access.principal, workspace_id=pipeline.workspace_id,
           action="n8n.pipeline.delete", resource_type="n8n_pipeline", resource_id=pipeline.id,
           details={"name": pipeline.name})  # fmt: skip
    await uow.session.delete(pipeline)
    await uow.session.flush()


async def next_stage(
    session: AsyncSession, pipeline: N8nPipeline, environment_id: uuid.UUID
) -> uuid.UUID | None:
    """The environment after `environment_id` in the pipeline (for promotions)."""
    ids = pipeline.environment_ids
    key = str(environment_id)
    if key not in ids or ids.index(key) == len(ids) - 1:
        return None
    return uuid.UUID(ids[ids.index(key) + 1])
