"""Executing a promotion: refuse a plan that cannot run (already run, not approved, a
gate closed, credentials missing, a target changed since the plan), then snapshot the
target, write, publish, read back and compare, record the deployment and make it the
drift baseline. A failed write, publish or verify puts the target back (a workflow we
created is deleted; one we changed gets its exact previous definition and publish state)
and the deployment says so."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.activity.service import record
from backend.auth.dependencies import WorkspaceAccess
from backend.config import Settings
from backend.kit.db import UnitOfWork
from backend.kit.errors import Conflict, UpstreamError
from backend.models import N8nEnvironment, N8nInstance, N8nWorkflow
from backend.models.n8n_promotions import N8nDeployment, N8nPromotion
from backend.n8n import client as n8n
from backend.n8n import promotions, snapshots, sync
from backend.n8n.api_types import WorkflowCreate
from backend.n8n.service import client_of


def _now() -> datetime:
    return datetime.now(UTC)


class Steps:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, step: str, ok: bool, detail: str = "", **extra: Any) -> None:
        self.items.append({"step": step, "ok": ok, "at": _now().isoformat(),
                           "detail": detail[:2000], **extra})  # fmt: skip


async def execute(
    uow: UnitOfWork, settings: Settings, access: WorkspaceAccess
) -> tuple[N8nPromotion, N8nDeployment]:
    session = uow.session
    promotion = await promotions.locked(session, access.resource.id)
    await promotions.follow_tasks(uow, settings, promotion)
    if promotion.deployment_id is not None or promotion.status in (
        "executing", "deployed", "rolled_back", "failed"
    ):  # fmt: skip
        raise Conflict(f"this promotion was already executed ({promotion.status})",
                       field="status", promotion_status=promotion.status,
                       deployment_id=str(promotion.deployment_id or ""))  # fmt: skip
    missing = promotion.plan["credentials"]["missing"]
    if missing:
        raise Conflict("credentials are missing on the target: create them there (same name "
                       "and type) and plan again", field="credentials",
                       missing=missing)  # fmt: skip
    to_env = await session.get(N8nEnvironment, promotion.to_env_id)
    target = await session.get(N8nInstance, promotion.target_instance_id)
    if to_env is None or target is None:
        raise Conflict("the target environment is gone", field="to_env")
    gates = await promotions.evaluate(session, promotion, to_env)
    closed = [g for g in gates if not g["passed"]]
    if promotion.status != "approved" or closed:
        await session.flush()
        raise Conflict(
            "the promotion cannot be executed: "
            + "; ".join(f"{g['name']}: {g['detail']}" for g in closed)
            if closed
            else f"the promotion is {promotion.status}",
            field="gates", keep_changes=True, promotion_status=promotion.status,
            gates=closed,
        )  # fmt: skip
    api = client_of(settings, target)
    async with api:
        before = await _target_now(api, target, promotion)
        promotion.status = "executing"
        await session.flush()
        record(session, access.principal, workspace_id=promotion.workspace_id,
               action="n8n.promotion.execute", resource_type="n8n_promotion",
               resource_id=promotion.id, details={"action": promotion.action})  # fmt: skip
        steps = Steps()
        deploy = N8nDeployment(
            id=uuid.uuid4(), workspace_id=promotion.workspace_id, promotion_id=promotion.id,
            environment_id=to_env.id, from_env_id=promotion.from_env_id, instance_id=target.id,
            lineage_id=promotion.lineage_id, n8n_workflow_id=promotion.target_workflow_id,
            name=promotion.name, action=promotion.action, status="executing", steps=[],
            digest=promotion.digest, by_user_id=access.user.id, created_at=_now(),
        )  # fmt: skip
        session.add(deploy)
        promotion.deployment_id = deploy.id
        await session.flush()
        outcome = await _carry_out(uow, settings, access, api, promotion, target, deploy,
                                   steps, before)  # fmt: skip
    deploy.steps = steps.items
    promotion.executed_by, promotion.executed_at = access.user.id, _now()
    for item in steps.items:
        record(session, access.principal, workspace_id=promotion.workspace_id,
               action=f"n8n.deployment.{item['step']}", resource_type="n8n_deployment",
               resource_id=deploy.id,
               details={k: v for k, v in item.items() if k != "at"})  # fmt: skip
    await session.flush()
    if outcome is not None:
        raise UpstreamError(
            f"the promotion failed ({outcome}); "
            + ("the target was put back as it was" if deploy.rolled_back
               else "the rollback failed too: see the deployment's steps"),
            keep_changes=True, deployment_id=str(deploy.id), deployment_status=deploy.status,
        )  # fmt: skip
    return promotion, deploy


async def _target_now(
    api: n8n.N8nClient, target: N8nInstance, promotion: N8nPromotion
) -> dict[str, Any] | None:
    """The target workflow as it is now; a plan it outran (edited, or deleted, since the
    plan was made: the diff people approved is not what would happen) is refused."""
    if promotion.target_workflow_id is None:
        return None
    try:
        before = dict(await api.workflow(promotion.target_workflow_id))
    except n8n.Missing:
        raise Conflict("the target workflow is gone since the plan: plan again",
                       field="target_workflow_id") from None  # fmt: skip
    except n8n.N8nFailure as exc:
        raise promotions.calls_failed(target, exc) from exc
    if snapshots.digest(promotions.compared(before)) != promotion.plan.get("target_digest"):
        raise Conflict("the target workflow changed since the plan: plan again to see the "
                       "new diff", field="target_workflow_id")  # fmt: skip
    return before


async def _carry_out(
    uow: UnitOfWork,
    settings: Settings,
    access: WorkspaceAccess,
    api: n8n.N8nClient,
    promotion: N8nPromotion,
    target: N8nInstance,
    deploy: N8nDeployment,
    steps: Steps,
    before: dict[str, Any] | None,
) -> str | None:
    """The steps; None when deployed, else what failed (the target rolled back)."""
    session = uow.session
    body: WorkflowCreate = promotion.body  # type: ignore[assignment]
    written_id: str | None = None
    created = False
    try:
        # 1. Snapshot the target as it is now.
        if promotion.target_workflow_id is not None and before is not None:
            pre = await snapshots.take(
                session, workspace_id=promotion.workspace_id, instance_id=target.id,
                n8n_workflow_id=promotion.target_workflow_id, reason="pre-promotion",
                by_user_id=access.user.id, note=f"promotion {promotion.id}",
                settings=settings, definition=before,
            )  # fmt: skip
            deploy.pre_snapshot_id = pre.id
            steps.add("snapshot", True, f"pre-promotion snapshot {pre.id}",
                      snapshot_id=str(pre.id))  # fmt: skip
        else:
            steps.add("snapshot", True, "a new workflow: nothing to snapshot")
        # 2. Write.
        if promotion.target_workflow_id is None:
            written = await api.create_workflow(body)
            written_id = str(written.get("id") or "")
            if not written_id:
                raise n8n.N8nFailure("n8n created the workflow but named no id")
            created = True
        else:
            written_id = promotion.target_workflow_id
            await api.update_workflow(written_id, body)
        deploy.n8n_workflow_id = promotion.target_workflow_id = written_id
        steps.add("write", True, f"{'created' if created else 'updated'} {written_id}",
                  n8n_workflow_id=written_id)  # fmt: skip
        # 3. Publish: a source that runs makes the target run; a target that ran
        # keeps running, on the new version (in 2.x a PUT alone leaves the old one on).
        if promotion.source_active or (before or {}).get("active"):
            await api.publish(written_id)
            steps.add("publish", True, "published")
        else:
            steps.add("publish", True, "left unpublished (the source is not active)")
        # 4. Verify.
        back = dict(await api.workflow(written_id))
        got = snapshots.digest(promotions.compared(back))
        if got != promotion.digest:
            changes = snapshots.diff(promotions.compared(dict(body)), promotions.compared(back))
            steps.add("verify", False, "the read-back differs from the plan",
                      differences=changes[:20])  # fmt: skip
            raise _Verify("the workflow read back differs from what was written")
        steps.add("verify", True, f"read back; digest {got[:12]} matches the plan",
                  marker=promotions.marker_of(back) == str(promotion.lineage_id))  # fmt: skip
    except (n8n.N8nFailure, _Verify) as exc:
        message = exc.message if isinstance(exc, n8n.N8nFailure) else str(exc)
        if not isinstance(exc, _Verify):
            steps.add(_failed_step(steps), False, message)
        ok = await _rollback(api, promotion, before, written_id, created, steps)
        return _end(promotion, deploy, message, rolled_back=ok)
    # 5. Record: the target's new state snapshotted, made the drift baseline, synced.
    post = await snapshots.take(
        session, workspace_id=promotion.workspace_id, instance_id=target.id,
        n8n_workflow_id=written_id, reason="promotion", by_user_id=access.user.id,
        note=f"promotion {promotion.id}", settings=settings, definition=back,
    )  # fmt: skip
    await snapshots.set_baseline(session, instance_id=target.id, n8n_workflow_id=written_id,
                                 snapshot_id=post.id)  # fmt: skip
    deploy.snapshot_id = post.id
    steps.add("baseline", True, f"drift baseline is snapshot {post.id}",
              snapshot_id=str(post.id))  # fmt: skip
    await promotions.link(
        session, promotion.workspace_id, promotion.lineage_id, target.id, written_id
    )
    await _sync_row(session, target, back)
    deploy.status, promotion.status = "deployed", "deployed"
    return None


class _Verify(Exception):
    pass


def _failed_step(steps: Steps) -> str:
    done = {s["step"] for s in steps.items}
    for step in ("snapshot", "write", "publish", "verify"):
        if step not in done:
            return step
    return "verify"


def _end(promotion: N8nPromotion, deploy: N8nDeployment, error: str, *, rolled_back: bool) -> str:
    deploy.error = error[:4000]
    deploy.rolled_back = rolled_back
    deploy.status = "rolled_back" if rolled_back else "failed"
    promotion.status = deploy.status
    return error


async def _rollback(
    api: n8n.N8nClient,
    promotion: N8nPromotion,
    before: dict[str, Any] | None,
    written_id: str | None,
    created: bool,
    steps: Steps,
) -> bool:
    """Put the target back: a workflow we created is deleted; one we changed gets its
    exact previous definition (node ids, positions, credential ids) and publish state."""
    try:
        if created and written_id:
            await api.delete_workflow(written_id)
            steps.add("rollback", True, f"deleted the workflow we created ({written_id})")
            promotion.target_workflow_id = None
            return True
        if before is None or written_id is None:
            steps.add("rollback", True, "nothing was written")
            return True
        restore: WorkflowCreate = {
            "name": str(before.get("name") or ""),
            "nodes": [{k: v for k, v in node.items() if k in snapshots.NODE_KEYS}  # type: ignore[misc]
                      for node in before.get("nodes") or [] if isinstance(node, dict)],
            "connections": dict(before.get("connections") or {}),
            "settings": {k: v for k, v in (before.get("settings") or {}).items()
                         if k in snapshots.SETTINGS_KEYS},
        }  # fmt: skip
        await api.update_workflow(written_id, restore)
        if before.get("active"):
            await api.publish(written_id)
        else:
            now = await api.workflow(written_id)
            if now.get("active"):
                await api.unpublish(written_id)
        back = dict(await api.workflow(written_id))
        same = snapshots.digest(promotions.compared(back)) == snapshots.digest(
            promotions.compared(before)
        )
        steps.add("rollback", same, "restored the pre-promotion definition"
                  if same else "restored, but the read-back differs from the snapshot")  # fmt: skip
        return same
    except n8n.N8nFailure as exc:
        steps.add("rollback", False, f"rollback failed: {exc.message}")
        return False


async def _sync_row(session: AsyncSession, instance: N8nInstance, workflow: dict[str, Any]) -> None:
    """Our synced copy of the target workflow, without waiting for the next sync."""
    wid = str(workflow.get("id") or "")
    row = await session.scalar(
        select(N8nWorkflow).where(N8nWorkflow.instance_id == instance.id,
                                  N8nWorkflow.n8n_id == wid)
    )  # fmt: skip
    if row is None:
        row = N8nWorkflow(id=uuid.uuid4(), workspace_id=instance.workspace_id,
                          instance_id=instance.id, n8n_id=wid, name="")  # fmt: skip
        session.add(row)
    sync.apply_workflow(row, workflow)  # type: ignore[arg-type]
    await session.flush()
