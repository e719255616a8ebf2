"""Snapshots of n8n workflows: a normalised definition, its digest, a diff between two,
taking one through the client, writing one back, and the baseline drift compares with.

Normalised means what a person changed, and nothing n8n or the canvas changes by itself:
nodes keyed by name (n8n's connections already are; ids are new on every import), no
node ids, positions or webhook ids, credentials by type and name (their ids are the
instance's own), settings without the keys n8n derives (binaryMode,
credentialResolverId), connections sorted, empty outputs dropped. What a restore needs to
put a workflow back exactly as it was (node ids, positions, webhook ids, credential ids)
is kept beside it in `refs`, outside the digest.

Interface used by promotions (part B): normalise, digest, diff, take, set_baseline,
to_n8n."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from backend.config import Settings, get_settings
from backend.kit.errors import NotFound
from backend.models import N8nBaseline, N8nInstance, N8nSnapshot
from backend.n8n import client as n8n
from backend.n8n.api_types import Workflow, WorkflowCreate

REASONS = ("manual", "pre-promotion", "nightly", "pre-restore", "drift", "baseline", "restore",
           "promotion")  # fmt: skip
# Node keys that say where a node is or which id n8n gave it, not what it does.
VOLATILE_NODE_KEYS = frozenset({"id", "position", "webhookId", "createdAt", "updatedAt"})
# Node keys a PUT accepts (n8n's spec forbids any other).
NODE_KEYS = frozenset({
    "alwaysOutputData", "continueOnFail", "credentials", "customTelemetryTags", "disabled",
    "executeOnce", "id", "maxTries", "name", "notes", "notesInFlow", "onError", "parameters",
    "position", "retryOnFail", "type", "typeVersion", "waitBetweenTries", "webhookId",
})  # fmt: skip
# Settings n8n derives itself and ignores when written.
DERIVED_SETTINGS = frozenset({"binaryMode", "credentialResolverId"})
# Settings a PUT accepts (additionalProperties is false in n8n's spec).
SETTINGS_KEYS = frozenset({
    "availableInMCP", "callerIds", "callerPolicy", "customTelemetryTags", "errorWorkflow",
    "executionOrder", "executionTimeout", "redactionPolicy", "saveDataErrorExecution",
    "saveDataSuccessExecution", "saveExecutionProgress", "saveManualExecutions",
    "timeSavedMode", "timeSavedPerExecution", "timezone",
})  # fmt: skip


# Normalising ------------------------------------------------------------------------------


def _credentials(value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not isinstance(value, dict):
        return out
    for kind, ref in value.items():
        if isinstance(ref, dict):
            out[str(kind)] = {"name": ref.get("name")}
        elif ref is not None:
            out[str(kind)] = {"name": str(ref)}
    return out


def _connections(value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not isinstance(value, dict):
        return out
    for source in sorted(value, key=str):
        kinds = value[source]
        if not isinstance(kinds, dict):
            continue
        per_kind: dict[str, Any] = {}
        for kind in sorted(kinds, key=str):
            outputs = kinds[kind]
            if not isinstance(outputs, list):
                continue
            lists = []
            for output in outputs:
                links = [link for link in (output or []) if isinstance(link, dict)]
                lists.append(
                    sorted(
                        ({"node": str(link.get("node", "")), "type": str(link.get("type", kind)),
                          "index": int(link.get("index", 0) or 0)} for link in links),
                        key=lambda link: (link["node"], link["type"], link["index"]),
                    )
                )  # fmt: skip
            # Trailing empty outputs mean nothing (the canvas adds and drops them).
            while lists and not lists[-1]:
                lists.pop()
            if lists:
                per_kind[str(kind)] = lists
        if per_kind:
            out[str(source)] = per_kind
    return out


def normalise(definition: dict[str, Any]) -> dict[str, Any]:
    """{name, nodes: {name: node without volatile keys}, connections, settings}."""
    nodes: dict[str, Any] = {}
    for node in definition.get("nodes") or []:
        if not isinstance(node, dict) or not isinstance(node.get("name"), str):
            continue
        clean = {k: v for k, v in node.items() if k not in VOLATILE_NODE_KEYS and k != "name"}
        if "credentials" in clean:
            clean["credentials"] = _credentials(clean["credentials"])
            if not clean["credentials"]:
                del clean["credentials"]
        clean.setdefault("parameters", {})
        nodes[node["name"]] = clean
    settings = definition.get("settings") or {}
    return {
        "name": str(definition.get("name") or ""),
        "nodes": nodes,
        "connections": _connections(definition.get("connections")),
        "settings": {
            k: v for k, v in settings.items() if k not in DERIVED_SETTINGS and v is not None
        }
        if isinstance(settings, dict)
        else {},
    }


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(normalised: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON: equal for equal definitions, whatever order."""
    return hashlib.sha256(canonical(normalised)).hexdigest()


def references(definition: dict[str, Any]) -> dict[str, Any]:
    """What normalise leaves out and a restore on the same instance puts back."""
    layout: dict[str, Any] = {}
    credentials: dict[str, str] = {}
    for node in definition.get("nodes") or []:
        if not isinstance(node, dict) or not isinstance(node.get("name"), str):
            continue
        layout[node["name"]] = {k: node[k] for k in ("id", "position", "webhookId") if k in node}
        for kind, ref in (node.get("credentials") or {}).items():
            if isinstance(ref, dict) and ref.get("id") and ref.get("name") is not None:
                credentials[f"{kind}/{ref['name']}"] = str(ref["id"])
    # The nodes' order on n8n (JSONB keeps object keys in its own order).
    return {"layout": layout, "credentials": credentials, "order": list(layout)}


def to_n8n(
    normalised: dict[str, Any],
    refs: dict[str, Any] | None = None,
    current: dict[str, Any] | None = None,
) -> WorkflowCreate:
    """A body for POST/PUT /workflows: node ids, positions and webhook ids from `refs`
    (the snapshot's own), else from the workflow as it is now (`current`, same node
    name), else new ones; credential ids likewise by type and name (a credential found
    in neither goes by name alone, which n8n shows as to be set up)."""
    now_refs = references(current) if current else {"layout": {}, "credentials": {}}
    mine = refs or {"layout": {}, "credentials": {}}
    layout = {**now_refs.get("layout", {}), **mine.get("layout", {})}
    cred_ids = {**now_refs.get("credentials", {}), **mine.get("credentials", {})}
    nodes: list[dict[str, Any]] = []
    given = normalised.get("nodes", {})
    order = [n for n in mine.get("order") or now_refs.get("order") or [] if n in given]
    names = order + sorted(n for n in given if n not in order)
    for i, name in enumerate(names):
        spec = given[name]
        node: dict[str, Any] = {k: v for k, v in spec.items() if k in NODE_KEYS}
        node["name"] = name
        place = layout.get(name, {})
        node["id"] = place.get("id") or str(uuid.uuid4())
        node["position"] = place.get("position") or [i * 220, 0]
        if place.get("webhookId"):
            node["webhookId"] = place["webhookId"]
        if isinstance(spec.get("credentials"), dict):
            creds: dict[str, Any] = {}
            for kind, ref in spec["credentials"].items():
                name_ = (ref or {}).get("name")
                cid = cred_ids.get(f"{kind}/{name_}")
                creds[kind] = {"id": cid, "name": name_} if cid else {"name": name_}
            node["credentials"] = creds
        nodes.append(node)
    settings = {k: v for k, v in (normalised.get("settings") or {}).items() if k in SETTINGS_KEYS}
    return {
        "name": normalised.get("name") or "Untitled",
        "nodes": nodes,  # type: ignore[typeddict-item]
        "connections": normalised.get("connections") or {},
        "settings": settings,
    }


# Diff ---------------------------------------------------------------------------------------


def _paths(before: Any, after: Any, path: str, out: list[dict[str, Any]]) -> None:
    if isinstance(before, dict) and isinstance(after, dict):
        for key in sorted(set(before) | set(after), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in before:
                out.append({"path": sub, "change": "added", "after": after[key]})
            elif key not in after:
                out.append({"path": sub, "change": "removed", "before": before[key]})
            else:
                _paths(before[key], after[key], sub, out)
        return
    if isinstance(before, list) and isinstance(after, list) and before != after:
        for i in range(max(len(before), len(after))):
            sub = f"{path}[{i}]"
            if i >= len(before):
                out.append({"path": sub, "change": "added", "after": after[i]})
            elif i >= len(after):
                out.append({"path": sub, "change": "removed", "before": before[i]})
            else:
                _paths(before[i], after[i], sub, out)
        return
    if before != after or type(before) is not type(after):
        out.append({"path": path, "change": "changed", "before": before, "after": after})


def diff(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """From normalised `a` to normalised `b`: name_changed, node_added, node_removed,
    node_changed (with each parameter path), connections_changed (per source node),
    settings_changed (per key). Empty when they are the same."""
    out: list[dict[str, Any]] = []
    if a.get("name") != b.get("name"):
        out.append({"kind": "name_changed", "before": a.get("name"), "after": b.get("name")})
    nodes_a, nodes_b = a.get("nodes") or {}, b.get("nodes") or {}
    for name in sorted(set(nodes_a) | set(nodes_b)):
        if name not in nodes_a:
            out.append({"kind": "node_added", "node": name, "type": nodes_b[name].get("type")})
        elif name not in nodes_b:
            out.append({"kind": "node_removed", "node": name, "type": nodes_a[name].get("type")})
        elif nodes_a[name] != nodes_b[name]:
            changes: list[dict[str, Any]] = []
            _paths(nodes_a[name], nodes_b[name], "", changes)
            out.append({"kind": "node_changed", "node": name, "type": nodes_b[name].get("type"),
                        "changes": changes})  # fmt: skip
    conn_a, conn_b = a.get("connections") or {}, b.get("connections") or {}
    for source in sorted(set(conn_a) | set(conn_b)):
        if conn_a.get(source) != conn_b.get(source):
            out.append({"kind": "connections_changed", "node": source,
                        "before": conn_a.get(source), "after": conn_b.get(source)})  # fmt: skip
    settings: list[dict[str, Any]] = []
    _paths(a.get("settings") or {}, b.get("settings") or {}, "", settings)
    for change in settings:
        out.append({"kind": "settings_changed", **change})
    return out


# Taking one -------------------------------------------------------------------------------


async def instance_of(
    session: AsyncSession, workspace_id: uuid.UUID, instance_id: uuid.UUID
) -> N8nInstance:
    instance = await session.get(N8nInstance, instance_id)
    if instance is None or instance.workspace_id != workspace_id:
        raise NotFound("n8n instance not found")
    return instance


async def fetch(settings: Settings, instance: N8nInstance, n8n_workflow_id: str) -> Workflow:
    """The workflow as n8n has it now; n8n's refusal is an UpstreamError (502), a
    workflow n8n does not know is NotFound."""
    from backend.n8n.service import client_of, upstream

    try:
        async with client_of(settings, instance) as api:
            return await api.workflow(n8n_workflow_id)
    except n8n.Missing as exc:
        raise NotFound(f"n8n has no workflow {n8n_workflow_id!r} on this instance") from exc
    except n8n.N8nFailure as exc:
        raise upstream(exc) from exc


def build(
    *,
    workspace_id: uuid.UUID,
    instance_id: uuid.UUID,
    n8n_workflow_id: str,
    definition: dict[str, Any],
    reason: str,
    by_user_id: uuid.UUID | None,
    note: str | None = None,
) -> N8nSnapshot:
    """A snapshot row (not added) of a definition n8n answered."""
    if reason not in REASONS:
        raise ValueError(f"unknown snapshot reason {reason!r}")
    normal = normalise(definition)
    version = definition.get("versionId")
    return N8nSnapshot(
        id=uuid.uuid4(),
        workspace_id=workspace_id,
        instance_id=instance_id,
        n8n_workflow_id=n8n_workflow_id,
        name=normal["name"][:500],
        active=bool(definition.get("active")),
        definition={**normal, "refs": references(definition)},
        digest=digest(normal),
        reason=reason,
        note=note,
        by_user_id=by_user_id,
        n8n_version_id=str(version)[:64] if version else None,
        node_count=len(normal["nodes"]),
        # The clock's time, not the transaction's: snapshots taken in one transaction
        # (pre-restore, restore) still list in the order they were taken.
        created_at=datetime.now(UTC),
    )


def normalised_of(snapshot: N8nSnapshot) -> dict[str, Any]:
    """The hashed part of a stored snapshot (its `refs` set aside)."""
    return {k: v for k, v in snapshot.definition.items() if k != "refs"}


def refs_of(snapshot: N8nSnapshot) -> dict[str, Any]:
    refs = snapshot.definition.get("refs")
    return refs if isinstance(refs, dict) else {}


async def take(
    session: AsyncSession,
    *,
    workspace_id: uuid.UUID,
    instance_id: uuid.UUID,
    n8n_workflow_id: str,
    reason: str,
    by_user_id: uuid.UUID | None,
    note: str | None = None,
    settings: Settings | None = None,
    definition: dict[str, Any] | None = None,
) -> N8nSnapshot:
    """Fetch the workflow from its instance (or use `definition`, already fetched) and
    store a snapshot of it. `settings` defaults to the process's (tests pass theirs)."""
    instance = await instance_of(session, workspace_id, instance_id)
    if definition is None:
        definition = dict(await fetch(settings or get_settings(), instance, n8n_workflow_id))
    row = build(
        workspace_id=workspace_id,
        instance_id=instance.id,
        n8n_workflow_id=n8n_workflow_id,
        definition=definition,
        reason=reason,
        by_user_id=by_user_id,
        note=note,
    )
    session.add(row)
    await session.flush()
    return row


async def latest(
    session: AsyncSession, instance_id: uuid.UUID, n8n_workflow_id: str
) -> N8nSnapshot | None:
    return await session.scalar(
        select(N8nSnapshot)
        .where(N8nSnapshot.instance_id == instance_id,
               N8nSnapshot.n8n_workflow_id == n8n_workflow_id)
        .order_by(N8nSnapshot.created_at.desc(), N8nSnapshot.id.desc())
        .limit(1)
    )  # fmt: skip


# Baselines --------------------------------------------------------------------------------


async def set_baseline(
    session: AsyncSession, *, instance_id: uuid.UUID, n8n_workflow_id: str, snapshot_id: uuid.UUID
) -> None:
    """Make the snapshot what drift compares this workflow with (a promotion or an
    accepted drift calls it). Idempotent; an open drift incident of the workflow is left
    to the next drift pass, which resolves it when the instance matches."""
    snapshot = await session.get(N8nSnapshot, snapshot_id)
    if snapshot is None or snapshot.instance_id != instance_id:
        raise NotFound("snapshot not found on this instance")
    stmt = insert(N8nBaseline).values(
        id=uuid.uuid4(),
        workspace_id=snapshot.workspace_id,
        instance_id=instance_id,
        n8n_workflow_id=n8n_workflow_id,
        snapshot_id=snapshot_id,
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["instance_id", "n8n_workflow_id"],
        set_={"snapshot_id": snapshot_id, "updated_at": func.now()},
    )
    await session.execute(stmt)


async def clear_baseline(
    session: AsyncSession, *, instance_id: uuid.UUID, n8n_workflow_id: str
) -> None:
    """The workflow is meant to be gone (an accepted deletion)."""
    row = await session.scalar(
        select(N8nBaseline).where(
            N8nBaseline.instance_id == instance_id, N8nBaseline.n8n_workflow_id == n8n_workflow_id
        )
    )
    if row is not None:
        await session.delete(row)
        await session.flush()


async def baseline_of(
    session: AsyncSession, instance_id: uuid.UUID, n8n_workflow_id: str
) -> N8nSnapshot | None:
    return await session.scalar(
        select(N8nSnapshot)
        .join(N8nBaseline, N8nBaseline.snapshot_id == N8nSnapshot.id)
        .where(N8nBaseline.instance_id == instance_id,
               N8nBaseline.n8n_workflow_id == n8n_workflow_id)
    )  # fmt: skip


# Writing one back -------------------------------------------------------------------------


async def write_back(
    settings: Settings,
    instance: N8nInstance,
    snapshot: N8nSnapshot,
    *,
    n8n_workflow_id: str | None,
    current: dict[str, Any] | None,
    publish: bool,
    unpublish: bool = False,
) -> Workflow:
    """PUT the snapshot over the workflow (or POST it when `n8n_workflow_id` is None or
    the workflow is gone), then publish it when `publish` (n8n 2.x runs the published
    version: a PUT alone leaves the old one running), or switch it off when `unpublish`
    and it is on. n8n's answer (read back)."""
    from backend.n8n.service import client_of, upstream

    body = to_n8n(normalised_of(snapshot), refs_of(snapshot), current)
    try:
        async with client_of(settings, instance) as api:
            written: Workflow | None = None
            if n8n_workflow_id:
                try:
                    written = await api.update_workflow(n8n_workflow_id, body)
                except n8n.Missing:
                    written = None
            if written is None:
                written = await api.create_workflow(body)
            wid = str(written.get("id") or n8n_workflow_id or "")
            if not wid:
                raise n8n.N8nFailure("n8n wrote the workflow but named no id")
            if publish:
                await api.publish(wid)
            elif unpublish and written.get("active"):
                await api.unpublish(wid)
            return await api.workflow(wid)
    except n8n.N8nFailure as exc:
        raise upstream(exc) from exc
