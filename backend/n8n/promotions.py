"""Promotions: copying one n8n workflow from an environment to the next one of a pipeline.

A plan (`plan`) is built and stored before anything is written: the target workflow it
will create or update, the credential mapping, the node-by-node diff against what the
target runs now, and the gates. Approvals are inbox tasks (one per approval the target
environment's policy asks for); a task decided in /tasks decides the promotion too (the
promotion reads its tasks whenever it is read or acted on). `execute` then snapshots the
target, writes, publishes, reads back and compares, records a deployment and moves the
drift baseline (backend/n8n/deployments.py); a failed step puts the target back.

The same workflow on several instances: a lineage id we keep (`n8n_lineages`, one row
per (instance, n8n workflow id)), and a marker we write into the target's settings
(`settings.customTelemetryTags`, key `orchestration-studio.lineage`, value the lineage
id: the one free-form list n8n's public API accepts in settings; tags would take extra
calls and their names are short). The table is the truth; the marker lets a lineage be
found again on a target whose table row was lost (or made by an earlier database).
Neither the diff nor the verification digest looks at the marker.

Credentials: n8n's public API lists credentials (id, name, type, never secrets) to owner
and admin keys (`credential:list`). With such a key, the target's credentials are
matched by name and type; with a lesser key (403) the plan falls back to the credential
references the target's own workflows carry (as synced, and the target workflow as read),
and says so (`credentials.source`). A credential found neither way is listed as missing,
never created: a plan with missing credentials cannot be executed (409)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.activity.service import record
from backend.auth.dependencies import WorkspaceAccess
from backend.config import Settings
from backend.inbox import service as inbox
from backend.kit.db import UnitOfWork
from backend.kit.errors import Conflict, NotFound, PermissionDenied, UpstreamError, ValidationFailed
from backend.models import (
    N8nDriftIncident,
    N8nEnvironment,
    N8nExecution,
    N8nInstance,
    N8nPipeline,
    N8nWorkflow,
    Task,
    WorkspaceMember,
)
from backend.models.n8n_promotions import N8nDeployment, N8nLineage, N8nPromotion
from backend.n8n import client as n8n
from backend.n8n import environments, snapshots
from backend.n8n.api_types import Workflow, WorkflowCreate
from backend.n8n.service import client_of, failed, upstream

MARKER_KEY = "orchestration-studio.lineage"
# The source's last finished runs that decide the success-rate gate, and how far back.
RUNS_WINDOW = 50
RUNS_DAYS = 30
DEFAULT_MIN_SUCCESS_RATE = 90.0
FINISHED = ("success", "error", "crashed")
# Settings that name workflows of the instance they are on: the target keeps its own.
INSTANCE_SETTINGS = ("errorWorkflow", "callerIds")
EXECUTABLE = ("approved",)


def _now() -> datetime:
    return datetime.now(UTC)


# The marker -------------------------------------------------------------------------------


def _telemetry(settings: Any) -> list[dict[str, Any]]:
    tags = settings.get("customTelemetryTags") if isinstance(settings, dict) else None
    return [t for t in tags or [] if isinstance(t, dict)] if isinstance(tags, list) else []


def marker_of(workflow: dict[str, Any]) -> str | None:
    for tag in _telemetry(workflow.get("settings")):
        if tag.get("key") == MARKER_KEY and isinstance(tag.get("value"), str):
            return str(tag["value"])
    return None


def unmarked(normalised: dict[str, Any]) -> dict[str, Any]:
    """A normalised definition without our marker (what diffs and digests compare)."""
    settings = dict(normalised.get("settings") or {})
    tags = [t for t in _telemetry(settings) if t.get("key") != MARKER_KEY]
    if tags:
        settings["customTelemetryTags"] = tags
    else:
        settings.pop("customTelemetryTags", None)
    return {**normalised, "settings": settings}


def compared(definition: dict[str, Any]) -> dict[str, Any]:
    return unmarked(snapshots.normalise(definition))


EMPTY: dict[str, Any] = {"name": "", "nodes": {}, "connections": {}, "settings": {}}


# Environments -----------------------------------------------------------------------------


async def _environment(session: AsyncSession, workspace_id: uuid.UUID, env_id: uuid.UUID,
                       field: str) -> tuple[N8nEnvironment, N8nInstance]:  # fmt: skip
    env = await session.get(N8nEnvironment, env_id)
    if env is None or env.workspace_id != workspace_id:
        raise NotFound("environment not found", field=field)
    instance = await session.get(N8nInstance, env.instance_id)
    if instance is None:
        raise NotFound("environment not found", field=field)
    return env, instance


async def _in_order(
    session: AsyncSession, workspace_id: uuid.UUID, source: uuid.UUID, target: uuid.UUID
) -> bool:
    """Whether some pipeline of the workspace leads from `source` to `target`."""
    rows = await session.scalars(
        select(N8nPipeline.environment_ids).where(N8nPipeline.workspace_id == workspace_id)
    )
    for ids in rows:
        order = [str(i) for i in ids or []]
        if (
            str(source) in order
            and str(target) in order
            and order.index(str(source)) < order.index(str(target))
        ):
            return True
    return False


def _required_approvals(env: N8nEnvironment) -> int:
    return max(environments.approvals_needed(env), 0)


# Lineage ----------------------------------------------------------------------------------


async def lineage_of(
    session: AsyncSession, workspace_id: uuid.UUID, instance_id: uuid.UUID, n8n_id: str
) -> uuid.UUID:
    """The workflow's lineage id, made on first use."""
    row = await session.scalar(
        select(N8nLineage).where(
            N8nLineage.instance_id == instance_id, N8nLineage.n8n_workflow_id == n8n_id
        )
    )
    if row is not None:
        return row.lineage_id
    row = N8nLineage(
        id=uuid.uuid4(),
        workspace_id=workspace_id,
        lineage_id=uuid.uuid4(),
        instance_id=instance_id,
        n8n_workflow_id=n8n_id,
    )
    session.add(row)
    await session.flush()
    return row.lineage_id


async def link(
    session: AsyncSession, workspace_id: uuid.UUID, lineage_id: uuid.UUID,
    instance_id: uuid.UUID, n8n_id: str,
) -> None:  # fmt: skip
    """Make (instance, workflow) the lineage's member on that instance (replacing a stale
    member there; a workflow leaves any other lineage it was in)."""
    await session.execute(
        delete(N8nLineage).where(
            N8nLineage.instance_id == instance_id,
            (N8nLineage.lineage_id == lineage_id) | (N8nLineage.n8n_workflow_id == n8n_id),
        )
    )
    session.add(
        N8nLineage(id=uuid.uuid4(), workspace_id=workspace_id, lineage_id=lineage_id,
                   instance_id=instance_id, n8n_workflow_id=n8n_id)
    )  # fmt: skip
    await session.flush()


async def _member(
    session: AsyncSession, lineage_id: uuid.UUID, instance_id: uuid.UUID
) -> str | None:
    return await session.scalar(
        select(N8nLineage.n8n_workflow_id).where(
            N8nLineage.lineage_id == lineage_id, N8nLineage.instance_id == instance_id
        )
    )


# Credentials ------------------------------------------------------------------------------


@dataclass
class CredentialPlan:
    mapped: list[dict[str, Any]]
    missing: list[dict[str, Any]]
    # Where the target's credentials were seen: list (GET /credentials) | workflow_refs.
    source: str
    # (type, source credential id) -> (target credential id, its name).
    ids: dict[tuple[str, str], tuple[str, str]]


def _refs(nodes: Sequence[Any]) -> list[tuple[str, str, str, str]]:
    """(type, id, name, node) of every credential the nodes use."""
    out: list[tuple[str, str, str, str]] = []
    for node in nodes:
        if not isinstance(node, dict):
            continue
        creds = node.get("credentials")
        for kind, ref in creds.items() if isinstance(creds, dict) else []:
            if isinstance(ref, dict):
                out.append((str(kind), str(ref.get("id") or ""), str(ref.get("name") or ""),
                            str(node.get("name") or "")))  # fmt: skip
    return out


async def _listed(api: n8n.N8nClient) -> list[dict[str, Any]] | None:
    """The instance's credentials, or None when the key may not list them."""
    try:
        return [dict(c) for c in await api.credentials()]
    except (n8n.Forbidden, n8n.Missing):
        return None


async def map_credentials(
    session: AsyncSession,
    source_list: list[dict[str, Any]] | None,
    target_api: n8n.N8nClient,
    target: N8nInstance,
    source_nodes: Sequence[Any],
    target_current: dict[str, Any] | None,
) -> CredentialPlan:
    used = _refs(source_nodes)
    if not used:
        return CredentialPlan([], [], "none needed", {})
    # The source's own list names each id as it is now (a node keeps the name it had
    # when the credential was picked); without it, the node's name.
    names = {(c.get("type"), c.get("id")): c.get("name") for c in source_list or []}
    target_list = await _listed(target_api)
    candidates: dict[tuple[str, str], set[str]] = {}
    if target_list is not None:
        kind = "list"
        for c in target_list:
            candidates.setdefault((str(c.get("type")), str(c.get("name"))), set()).add(
                str(c.get("id"))
            )
    else:
        kind = "workflow_refs"
        rows = await session.scalars(
            select(N8nWorkflow.definition).where(N8nWorkflow.instance_id == target.id)
        )
        definitions = [d for d in rows if isinstance(d, dict)]
        if target_current:
            definitions.append(dict(target_current))
        for definition in definitions:
            for type_, cid, name, _ in _refs(definition.get("nodes") or []):
                if cid:
                    candidates.setdefault((type_, name), set()).add(cid)
    grouped: dict[tuple[str, str], dict[str, Any]] = {}
    for type_, cid, node_name, node in used:
        name = str(names.get((type_, cid)) or node_name)
        entry = grouped.setdefault(
            (type_, cid), {"type": type_, "name": name, "source_id": cid or None, "nodes": []}
        )
        if node not in entry["nodes"]:
            entry["nodes"].append(node)
    mapped: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    ids: dict[tuple[str, str], tuple[str, str]] = {}
    for (type_, cid), entry in sorted(grouped.items(), key=lambda kv: (kv[0][0], kv[1]["name"])):
        found = sorted(candidates.get((type_, entry["name"]), set()))
        if len(found) == 1:
            mapped.append({**entry, "target_id": found[0]})
            ids[(type_, cid)] = (found[0], entry["name"])
        elif not found:
            missing.append({**entry, "reason": f"no {type_} credential named "
                            f"{entry['name']!r} on the target"})  # fmt: skip
        else:
            missing.append({**entry, "reason": f"{len(found)} {type_} credentials named "
                            f"{entry['name']!r} on the target: rename all but one"})  # fmt: skip
    return CredentialPlan(mapped, missing, kind, ids)


# The body ---------------------------------------------------------------------------------


def target_body(
    source: Workflow,
    target_current: dict[str, Any] | None,
    target: N8nInstance,
    credential_ids: dict[tuple[str, str], tuple[str, str]],
    lineage_id: uuid.UUID,
) -> WorkflowCreate:
    """What is written to the target: the source's nodes, connections and settings, with
    credential ids the target's, node ids and webhook ids kept from the target's nodes of
    the same name (so its webhooks keep their URLs), the settings that name the target's
    own workflows kept, and our lineage marker."""
    layout = snapshots.references(target_current)["layout"] if target_current else {}
    nodes: list[dict[str, Any]] = []
    for node in source.get("nodes") or []:
        if not isinstance(node, dict):
            continue
        out = {k: v for k, v in node.items() if k in snapshots.NODE_KEYS}
        mine = layout.get(str(node.get("name")), {})
        for key in ("id", "webhookId"):
            if mine.get(key):
                out[key] = mine[key]
        creds = node.get("credentials")
        if isinstance(creds, dict):
            rewritten: dict[str, Any] = {}
            for kind, ref in creds.items():
                ref = ref if isinstance(ref, dict) else {}
                found = credential_ids.get((str(kind), str(ref.get("id") or "")))
                # The target's id, and the name it has there (a node keeps the name its
                # credential had when picked; the source's list names it as it is now).
                rewritten[kind] = {"id": found[0], "name": found[1]} if found else dict(ref)
            out["credentials"] = rewritten
        nodes.append(out)
    raw = source.get("settings")
    settings: dict[str, Any] = {
        k: v
        for k, v in (raw if isinstance(raw, dict) else {}).items()
        if k in snapshots.SETTINGS_KEYS and k not in INSTANCE_SETTINGS and v is not None
    }
    theirs = (target_current or {}).get("settings") or {}
    for key in INSTANCE_SETTINGS:
        if isinstance(theirs, dict) and theirs.get(key):
            settings[key] = theirs[key]
    if "errorWorkflow" not in settings and target.error_workflow_id:
        settings["errorWorkflow"] = target.error_workflow_id
    tags = [t for t in _telemetry(settings) if t.get("key") != MARKER_KEY]
    settings["customTelemetryTags"] = [*tags, {"key": MARKER_KEY, "value": str(lineage_id)}]
    return {
        "name": str(source.get("name") or "Untitled"),
        "nodes": nodes,  # type: ignore[typeddict-item]
        "connections": dict(source.get("connections") or {}),
        "settings": settings,
    }


# Gates ------------------------------------------------------------------------------------


async def success_gate(
    session: AsyncSession, instance_id: uuid.UUID, n8n_id: str, threshold: float
) -> dict[str, Any]:
    since = _now() - timedelta(days=RUNS_DAYS)
    statuses = (
        await session.scalars(
            select(N8nExecution.status)
            .where(
                N8nExecution.instance_id == instance_id,
                N8nExecution.workflow_n8n_id == n8n_id,
                N8nExecution.status.in_(FINISHED),
                N8nExecution.started_at >= since,
            )
            .order_by(N8nExecution.started_at.desc())
            .limit(RUNS_WINDOW)
        )
    ).all()
    runs = len(statuses)
    ok = sum(1 for s in statuses if s == "success")
    rate = round(100.0 * ok / runs, 2) if runs else None
    passed = (rate is not None and rate >= threshold) or threshold <= 0
    reason = (
        f"{ok} of the last {runs} finished runs succeeded ({rate}%; at least {threshold:g}% needed)"
        if runs
        else f"no finished runs in the last {RUNS_DAYS} days (as synced) to judge"
    )
    return {"name": "success_rate", "passed": passed, "threshold": threshold, "rate": rate,
            "runs": runs, "succeeded": ok, "detail": reason}  # fmt: skip


async def drift_gate(
    session: AsyncSession, instance_id: uuid.UUID, n8n_id: str | None
) -> dict[str, Any]:
    if n8n_id is None:
        return {"name": "no_open_drift", "passed": True, "incidents": [],
                "detail": "a new workflow: nothing to drift"}  # fmt: skip
    ids = (
        await session.scalars(
            select(N8nDriftIncident.id).where(
                N8nDriftIncident.instance_id == instance_id,
                N8nDriftIncident.n8n_workflow_id == n8n_id,
                N8nDriftIncident.status.in_(("open", "acknowledged")),
            )
        )
    ).all()
    return {
        "name": "no_open_drift",
        "passed": not ids,
        "incidents": [str(i) for i in ids],
        "detail": "no open drift incident on the target workflow"
        if not ids
        else "the target workflow has an open drift incident: accept or revert it first",
    }


def hours_gate(env: N8nEnvironment, now: datetime) -> dict[str, Any]:
    """The target environment's allowed hours, read as the environments module reads
    them (days 0 = Monday; a window over midnight belongs to the day it opens)."""
    window = env.allowed_hours or {}
    inside = environments.within_hours(env, now)
    if not window:
        detail = "no allowed-hours policy"
    else:
        span = f"{window.get('start')}-{window.get('end')} {window.get('timezone')}"
        days = f" on days {window['days']} (0 = Monday)" if window.get("days") else ""
        detail = ("within " if inside else "outside ") + span + days
    return {"name": "allowed_hours", "passed": inside, "detail": detail, "policy": window}


def approvals_gate(promotion: N8nPromotion, required: int) -> dict[str, Any]:
    have = len(promotion.approved_by or [])
    if promotion.rejected_by is not None or promotion.status == "rejected":
        return {"name": "approvals", "passed": False, "required": required, "approved": have,
                "detail": "rejected"}  # fmt: skip
    return {"name": "approvals", "passed": have >= required, "required": required,
            "approved": have, "detail": f"{have} of {required} approvals"}  # fmt: skip


def credentials_gate(missing: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": "credentials", "passed": not missing, "missing": len(missing),
            "detail": "every credential mapped" if not missing
            else f"{len(missing)} credential(s) missing on the target"}  # fmt: skip


# Planning ---------------------------------------------------------------------------------


@dataclass
class PlanRequest:
    instance_id: uuid.UUID
    n8n_workflow_id: str
    from_env: uuid.UUID
    to_env: uuid.UUID
    min_success_rate: float | None
    target_workflow_id: str | None
    note: str | None


async def _read_target(api: n8n.N8nClient, wid: str | None) -> dict[str, Any] | None:
    if wid is None:
        return None
    try:
        return dict(await api.workflow(wid))
    except n8n.Missing:
        return None


def calls_failed(instance: N8nInstance, exc: n8n.N8nFailure) -> UpstreamError:
    if exc.kind in ("unreachable", "unauthorized"):
        failed(instance, exc)
    return upstream(exc)


async def plan(
    uow: UnitOfWork, settings: Settings, access: WorkspaceAccess, req: PlanRequest
) -> N8nPromotion:
    session = uow.session
    ws = access.workspace.id
    if req.from_env == req.to_env:
        raise ValidationFailed("from_env and to_env must differ", field="to_env")
    from_env, source = await _environment(session, ws, req.from_env, "from_env")
    to_env, target = await _environment(session, ws, req.to_env, "to_env")
    if req.instance_id != source.id:
        raise ValidationFailed(
            "the workflow's instance is not from_env's instance", field="workflow.instance_id"
        )
    if not await _in_order(session, ws, from_env.id, to_env.id):
        raise Conflict(
            "no pipeline of this workspace leads from from_env to to_env", field="to_env"
        )
    lineage_id = await lineage_of(session, ws, source.id, req.n8n_workflow_id)
    calling = source
    try:
        async with (
            client_of(settings, source) as source_api,
            client_of(settings, target) as target_api,
        ):
            try:
                workflow = await source_api.workflow(req.n8n_workflow_id)
            except n8n.Missing as exc:
                raise NotFound(
                    "n8n has no such workflow on the source instance",
                    field="workflow.n8n_workflow_id",
                ) from exc
            calling = target
            matched_by, target_id, current = await _find_target(
                session, target_api, ws, lineage_id, target, req.target_workflow_id
            )
            calling = source
            source_list = await _listed(source_api)
            calling = target
            creds = await map_credentials(
                session, source_list, target_api, target, workflow.get("nodes") or [], current
            )
    except n8n.N8nFailure as exc:
        raise calls_failed(calling, exc) from exc
    body = target_body(workflow, current, target, creds.ids, lineage_id)
    for what, value, field in (("source", workflow, "workflow.n8n_workflow_id"),
                               ("target", current, "target_workflow_id")):  # fmt: skip
        # n8n stores what PostgreSQL cannot (a NUL in a parameter): say so, not a 500.
        if value is not None and _has_nul(value):
            raise ValidationFailed(
                f"the {what} workflow holds a NUL character (\\u0000), which cannot be "
                "stored; remove it in n8n first",
                field=field,
            )
    after = compared(dict(body))
    before = compared(current) if current is not None else EMPTY
    threshold = (
        req.min_success_rate if req.min_success_rate is not None else DEFAULT_MIN_SUCCESS_RATE
    )
    promotion = N8nPromotion(
        id=uuid.uuid4(),
        workspace_id=ws,
        lineage_id=lineage_id,
        from_env_id=from_env.id,
        to_env_id=to_env.id,
        source_instance_id=source.id,
        source_workflow_id=req.n8n_workflow_id,
        source_active=bool(workflow.get("active")),
        target_instance_id=target.id,
        target_workflow_id=target_id,
        action="update" if target_id else "create",
        matched_by=matched_by,
        name=str(workflow.get("name") or "")[:500],
        status="blocked" if creds.missing else "awaiting_approval",
        plan={
            "credentials": {
                "source": creds.source,
                "mapped": creds.mapped,
                "missing": creds.missing,
            },
            "diff": snapshots.diff(before, after),
            "target_digest": snapshots.digest(before) if current is not None else None,
            "target_active": bool((current or {}).get("active")),
            "note": req.note,
            "gates": [],
        },
        body=dict(body),
        digest=snapshots.digest(after),
        min_success_rate=threshold,
        task_ids=[],
        requested_by=access.user.id,
        approved_by=[],
        created_at=_now(),
    )
    session.add(promotion)
    await session.flush()
    required = _required_approvals(to_env)
    if not creds.missing:
        if required == 0:
            promotion.status = "approved"
        else:
            await _open_tasks(uow, settings, promotion, to_env, required, access.user.id)
    await evaluate(session, promotion, to_env)
    await session.flush()
    record(session, access.principal, workspace_id=ws, action="n8n.promotion.plan",
           resource_type="n8n_promotion", resource_id=promotion.id,
           details={"workflow": req.n8n_workflow_id, "from_env": str(from_env.id),
                    "to_env": str(to_env.id), "action": promotion.action,
                    "matched_by": matched_by, "status": promotion.status,
                    "missing_credentials": len(creds.missing),
                    "changes": len(promotion.plan["diff"])})  # fmt: skip
    return promotion


def _has_nul(value: Any) -> bool:
    """Whether any key or text in the JSON holds a NUL (iterative: n8n's JSON may nest
    deeper than Python recursion allows)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


async def _find_target(
    session: AsyncSession,
    api: n8n.N8nClient,
    workspace_id: uuid.UUID,
    lineage_id: uuid.UUID,
    target: N8nInstance,
    explicit: str | None,
) -> tuple[str, str | None, dict[str, Any] | None]:
    """(matched_by, target n8n id or None, the target as it is now)."""
    if explicit is not None:
        current = await _read_target(api, explicit)
        if current is None:
            raise NotFound("n8n has no such workflow on the target", field="target_workflow_id")
        other = await session.scalar(
            select(N8nLineage.lineage_id).where(
                N8nLineage.instance_id == target.id, N8nLineage.n8n_workflow_id == explicit
            )
        )
        if other is not None and other != lineage_id:
            raise Conflict(
                "that target workflow already stands for another workflow",
                field="target_workflow_id",
            )
        return "explicit", explicit, current
    known = await _member(session, lineage_id, target.id)
    if known is not None:
        current = await _read_target(api, known)
        if current is not None:
            return "lineage", known, current
    for listed in await api.workflows():
        if marker_of(dict(listed)) == str(lineage_id) and listed.get("id"):
            wid = str(listed["id"])
            return "marker", wid, dict(await api.workflow(wid))
    return "none", None, None


async def _open_tasks(
    uow: UnitOfWork,
    settings: Settings,
    promotion: N8nPromotion,
    env: N8nEnvironment,
    required: int,
    created_by: uuid.UUID,
    *,
    first: int = 0,
) -> None:
    """One inbox task per approval the policy asks for, for the people it names (those
    still members) and/or the role it names; `first` numbers tasks opened later."""
    policy = env.approvals or {}
    members = set(
        await uow.session.scalars(
            select(WorkspaceMember.user_id).where(
                WorkspaceMember.workspace_id == promotion.workspace_id
            )
        )
    )
    named = [uuid.UUID(str(u)) for u in policy.get("approver_ids") or [] if _is_uuid(u)]
    assignees = [u for u in named if u in members]
    min_role = policy.get("approver_min_role") if isinstance(
        policy.get("approver_min_role"), str) else None  # fmt: skip
    if not assignees and min_role is None:
        # Nobody named (or everyone named left): administrators decide, as the
        # environment's policy reads it (environments.may_approve), rather than any editor.
        min_role = "administrator"
    plan = promotion.plan
    data = {
        "promotion_id": str(promotion.id),
        "workflow": promotion.name,
        "action": promotion.action,
        "from_env": str(promotion.from_env_id),
        "to_env": str(promotion.to_env_id),
        "changes": plan["diff"][:50],
        "credentials": plan["credentials"]["mapped"],
    }
    total = first + required
    for index in range(first, total):
        spec = inbox.TaskSpec(
            title=f"Promote {promotion.name!r} to {env.stage}"
            + (f" ({index + 1} of {total})" if total > 1 else ""),
            message=(f"{promotion.action.title()} of {promotion.name!r} requested; "
                     f"{len(plan['diff'])} change(s). Decide here or with "
                     f"POST /api/v1/n8n/promotions/{promotion.id}/approve|reject."),
            data=data, form=None, assignees=assignees, min_role=min_role,
            expires_in=None, on_timeout="reject",
        )  # fmt: skip
        task = await inbox.create_manual(
            uow, settings, workspace_id=promotion.workspace_id,
            created_by=created_by, spec=spec,
        )  # fmt: skip
        promotion.task_ids = [*promotion.task_ids, str(task.id)]


def _is_uuid(value: Any) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


async def evaluate(
    session: AsyncSession, promotion: N8nPromotion, to_env: N8nEnvironment
) -> list[dict[str, Any]]:
    """The gates as they stand now (stored on the plan)."""
    gates = [
        credentials_gate(promotion.plan["credentials"]["missing"]),
        await success_gate(
            session,
            promotion.source_instance_id,
            promotion.source_workflow_id,
            promotion.min_success_rate if promotion.min_success_rate is not None else 0.0,
        ),
        await drift_gate(session, promotion.target_instance_id, promotion.target_workflow_id),
        approvals_gate(promotion, _required_approvals(to_env)),
        hours_gate(to_env, _now()),
    ]
    promotion.plan = {**promotion.plan, "gates": gates, "evaluated_at": _now().isoformat()}
    return gates


# Approvals --------------------------------------------------------------------------------


async def _tasks(session: AsyncSession, promotion: N8nPromotion) -> list[Task]:
    ids = [uuid.UUID(t) for t in promotion.task_ids]
    if not ids:
        return []
    rows = await session.scalars(select(Task).where(Task.id.in_(ids)).order_by(Task.created_at))
    return list(rows)


async def follow_tasks(uow: UnitOfWork, settings: Settings, promotion: N8nPromotion) -> None:
    """Bring the promotion in line with its tasks (decided here or in /tasks). Logged as
    done by whoever decided the task."""
    session = uow.session
    if promotion.status != "awaiting_approval":
        return
    tasks = await _tasks(session, promotion)
    approvers: list[str] = []
    for task in tasks:
        if task.status in ("rejected", "expired", "cancelled"):
            promotion.status = "rejected"
            promotion.rejected_by = task.decided_by
            comment = (task.decision or {}).get("comment")
            promotion.decision_comment = str(comment)[:10_000] if comment else task.status
            record(session, None, user_id=task.decided_by,
                   workspace_id=promotion.workspace_id,
                   action="n8n.promotion.rejected", resource_type="n8n_promotion",
                   resource_id=promotion.id,
                   details={"task_id": str(task.id), "task_status": task.status,
                            "by": str(task.decided_by) if task.decided_by else None})  # fmt: skip
            await session.flush()
            return
        if task.status == "approved" and task.decided_by is not None:
            who = str(task.decided_by)
            if who not in approvers:
                approvers.append(who)
    promotion.approved_by = approvers
    env = await session.get(N8nEnvironment, promotion.to_env_id)
    required = _required_approvals(env) if env is not None else len(tasks)
    if tasks and all(t.status == "approved" for t in tasks):
        last = tasks[-1].decided_by
        creator = promotion.requested_by or last
        if len(approvers) >= required:
            promotion.status = "approved"
            record(session, None, user_id=last, workspace_id=promotion.workspace_id,
                   action="n8n.promotion.approved", resource_type="n8n_promotion",
                   resource_id=promotion.id, details={"approved_by": approvers})  # fmt: skip
        elif env is not None and creator is not None:
            # One person approved several of its tasks (possible in /tasks): their
            # approvals count once; open tasks for the approvals still wanting.
            await _open_tasks(uow, settings, promotion, env, required - len(approvers),
                              creator, first=len(tasks))  # fmt: skip
            record(session, None, workspace_id=promotion.workspace_id,
                   action="n8n.promotion.approval_reopened", resource_type="n8n_promotion",
                   resource_id=promotion.id,
                   details={"approved_by": approvers, "required": required})  # fmt: skip
    await session.flush()


async def decide(
    uow: UnitOfWork, settings: Settings, access: WorkspaceAccess, *, approve: bool,
    comment: str | None,
) -> N8nPromotion:  # fmt: skip
    """Decide one of the promotion's open tasks the caller may decide (the task is
    decided in the inbox too)."""
    promotion = await locked(uow.session, access.resource.id)
    await follow_tasks(uow, settings, promotion)
    if promotion.status != "awaiting_approval":
        raise Conflict(f"this promotion is {promotion.status}", field="status",
                       promotion_status=promotion.status)  # fmt: skip
    tasks = await _tasks(uow.session, promotion)
    open_tasks = [t for t in tasks if t.status == "open"]
    if approve and str(access.user.id) in {str(t.decided_by) for t in tasks if t.decided_by}:
        raise Conflict("you already approved this promotion; another person must",
                       field="approved_by")  # fmt: skip
    mine = [t for t in open_tasks if inbox.may_act(t, access.user.id, access.role)]
    if not mine:
        raise PermissionDenied("this promotion's approval is not yours to decide")
    via = "api_key" if access.principal.api_key is not None else "api"
    await inbox.decide(uow, settings, mine[0].id, user=access.user, role=access.role,
                       approve=approve, comment=comment, value=None, via=via)  # fmt: skip
    await follow_tasks(uow, settings, promotion)
    env = await uow.session.get(N8nEnvironment, promotion.to_env_id)
    if env is not None:
        await evaluate(uow.session, promotion, env)
    await uow.session.flush()
    return promotion


async def locked(session: AsyncSession, promotion_id: uuid.UUID) -> N8nPromotion:
    row = await session.get(
        N8nPromotion, promotion_id, with_for_update=True, populate_existing=True
    )
    if row is None:
        raise NotFound("promotion not found")
    return row


# Reading ----------------------------------------------------------------------------------


def list_query(
    workspace_id: uuid.UUID, *, status: str | None, environment: uuid.UUID | None
) -> Select[Any]:
    stmt = select(N8nPromotion).where(N8nPromotion.workspace_id == workspace_id)
    if status:
        stmt = stmt.where(N8nPromotion.status == status)
    if environment:
        stmt = stmt.where(
            (N8nPromotion.to_env_id == environment) | (N8nPromotion.from_env_id == environment)
        )
    return stmt.order_by(N8nPromotion.created_at.desc(), N8nPromotion.id)


def deployments_query(
    workspace_id: uuid.UUID, *, environment: uuid.UUID | None, lineage: uuid.UUID | None
) -> Select[Any]:
    stmt = select(N8nDeployment).where(N8nDeployment.workspace_id == workspace_id)
    if environment:
        stmt = stmt.where(N8nDeployment.environment_id == environment)
    if lineage:
        stmt = stmt.where(N8nDeployment.lineage_id == lineage)
    return stmt.order_by(N8nDeployment.created_at.desc(), N8nDeployment.id)


async def deployment(session: AsyncSession, promotion: N8nPromotion) -> N8nDeployment | None:
    if promotion.deployment_id is None:
        return None
    return await session.get(N8nDeployment, promotion.deployment_id)
