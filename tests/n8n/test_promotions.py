"""/api/v1/n8n/promotions and /deployments against two loopback stand-ins (a dev and a
production n8n): create and update paths, the lineage and its marker, credentials mapped
by name and type (missing ones refuse execution), gates, approvals through inbox tasks,
rollback when a step fails half-way, hostile input and other workspaces."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.permissions import Role
from backend.config import Settings
from backend.models import (
    ActivityLog,
    N8nBaseline,
    N8nDriftIncident,
    N8nEnvironment,
    N8nLineage,
    N8nPipeline,
    N8nSnapshot,
    Task,
    Workspace,
)
from backend.n8n import promotions
from backend.n8n.api_types import Credential
from tests.n8n import spec
from tests.n8n.standin import StandIn, running
from tests.support.identity import Actor, make_workspace, member

URL = "/api/v1/n8n/promotions"
INSTANCES = "/api/v1/n8n/instances"
CRED_TYPE = "slackApi"


@pytest.fixture(scope="module")
def dev_server() -> Iterator[StandIn]:
    with running(StandIn(ids=itertools.count(1000))) as s:
        yield s


@pytest.fixture(scope="module")
def prod_server() -> Iterator[StandIn]:
    with running(StandIn(ids=itertools.count(5000))) as s:
        yield s


@pytest.fixture
def dev(dev_server: StandIn) -> Iterator[StandIn]:
    dev_server.reset()
    yield dev_server
    assert dev_server.violations == []


@pytest.fixture
def prod(prod_server: StandIn) -> Iterator[StandIn]:
    prod_server.reset()
    yield prod_server
    assert prod_server.violations == []


@dataclass
class Fleet:
    dev_instance: str
    prod_instance: str
    dev_env: uuid.UUID
    prod_env: uuid.UUID
    prod_row: N8nEnvironment


async def connect(api: httpx.AsyncClient, actor: Actor, s: StandIn, name: str) -> str:
    body = {"name": name, "base_url": s.base, "api_key": s.api_key}
    r = await api.post(INSTANCES, headers=actor.headers, json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def fleet(
    api: httpx.AsyncClient,
    session: AsyncSession,
    actor: Actor,
    team: Workspace,
    dev: StandIn,
    prod: StandIn,
    approvals: dict[str, Any] | None = None,
    hours: dict[str, Any] | None = None,
) -> Fleet:
    """Two instances, a dev and a production environment, a pipeline dev -> production."""
    d = await connect(api, actor, dev, "dev")
    p = await connect(api, actor, prod, "prod")
    dev_env = N8nEnvironment(id=uuid.uuid4(), workspace_id=team.id, instance_id=uuid.UUID(d),
                             stage="dev")  # fmt: skip
    prod_env = N8nEnvironment(id=uuid.uuid4(), workspace_id=team.id, instance_id=uuid.UUID(p),
                              stage="production", protected=True, approvals=approvals or {},
                              allowed_hours=hours or {})  # fmt: skip
    session.add_all([dev_env, prod_env])
    await session.flush()
    session.add(N8nPipeline(id=uuid.uuid4(), workspace_id=team.id, name="main",
                            environment_ids=[str(dev_env.id), str(prod_env.id)]))  # fmt: skip
    await session.flush()
    return Fleet(d, p, dev_env.id, prod_env.id, prod_env)


def slack_workflow(s: StandIn, cred: dict[str, Any], *, active: bool = True,
                   text: str = "hello") -> dict[str, Any]:  # fmt: skip
    workflow = s.add_workflow("Notify team", active=active, nodes=1)
    workflow["nodes"].append(
        {"id": f"{workflow['id']}-slack", "name": "Slack", "type": "n8n-nodes-base.slack",
         "typeVersion": 2, "position": [220, 0], "parameters": {"text": text},
         "credentials": {CRED_TYPE: {"id": cred["id"], "name": cred["name"]}}}
    )  # fmt: skip
    workflow["connections"] = {
        "Webhook": {"main": [[{"node": "Slack", "type": "main", "index": 0}]]}
    }
    return workflow


async def sync(api: httpx.AsyncClient, actor: Actor, iid: str) -> None:
    r = await api.post(f"{INSTANCES}/{iid}/refresh", headers=actor.headers)
    assert r.status_code == 200 and r.json()["ok"], r.text


def plan_body(f: Fleet, wid: str, **extra: Any) -> dict[str, Any]:
    return {"workflow": {"instance_id": f.dev_instance, "n8n_workflow_id": wid},
            "from_env": str(f.dev_env), "to_env": str(f.prod_env), **extra}  # fmt: skip


async def plan(api: httpx.AsyncClient, actor: Actor, body: dict[str, Any]) -> dict[str, Any]:
    r = await api.post(URL, headers=actor.headers, json=body)
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def gate(promotion: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(g for g in promotion["plan"]["gates"] if g["name"] == name)
    return found


def test_credential_keys_are_properties_of_the_spec() -> None:
    listed = spec.properties("/credentials", "get", 200, "data", "items")
    assert set(Credential.__annotations__) <= listed


async def test_create_then_update_with_credentials_mapped_and_an_approval(
    api: httpx.AsyncClient, session: AsyncSession, settings: Settings, team: Workspace,
    editor: Actor, dev: StandIn, prod: StandIn,
) -> None:  # fmt: skip
    approver = await member(session, settings, team, Role.ADMINISTRATOR)
    approver.headers["X-Workspace-ID"] = str(team.id)
    policy = {"min_approvals": 1, "approver_ids": [str(approver.user.id)]}
    f = await fleet(api, session, editor, team, dev, prod, approvals=policy)
    dev_cred = dev.add_credential("Team Slack", CRED_TYPE)
    prod_cred = prod.add_credential("Team Slack", CRED_TYPE)
    prod.add_credential("Team Slack", "githubApi")  # same name, another type: not it
    wf = slack_workflow(dev, dev_cred)
    for _ in range(9):
        dev.add_execution(wf["id"], "success")
    dev.add_execution(wf["id"], "error", error="boom", node="Slack")
    await sync(api, editor, f.dev_instance)

    p = await plan(api, editor, plan_body(f, wf["id"]))
    assert (p["action"], p["matched_by"], p["status"]) == ("create", "none", "awaiting_approval")
    assert p["target_workflow_id"] is None and p["source_active"] is True
    creds = p["plan"]["credentials"]
    assert creds["source"] == "list" and creds["missing"] == []
    assert [(m["type"], m["name"], m["source_id"], m["target_id"], m["nodes"])
            for m in creds["mapped"]] == [
        (CRED_TYPE, "Team Slack", dev_cred["id"], prod_cred["id"], ["Slack"])]  # fmt: skip
    assert {d["kind"] for d in p["plan"]["diff"]} >= {"node_added", "name_changed"}
    assert gate(p, "success_rate")["rate"] == 90.0 and gate(p, "success_rate")["passed"]
    assert gate(p, "approvals") == {**gate(p, "approvals"), "passed": False, "required": 1}
    assert not prod.workflows  # planning writes nothing
    # Not approved yet: execute is refused and nothing is written.
    r = await api.post(f"{URL}/{p['id']}/execute", headers=editor.headers)
    assert r.status_code == 409 and r.json()["field"] == "gates", r.text
    assert not prod.workflows
    # The approval is an inbox task for the named approver; the requester cannot decide it.
    [task_id] = p["task_ids"]
    r = await api.get(f"/api/v1/tasks/{task_id}", headers=approver.headers)
    assert r.status_code == 200 and r.json()["can_decide"] is True
    assert r.json()["data"]["promotion_id"] == p["id"]
    r = await api.post(f"{URL}/{p['id']}/approve", headers=editor.headers, json={})
    assert r.status_code == 403, r.text
    # Deciding the task in /tasks decides the promotion.
    r = await api.post(f"/api/v1/tasks/{task_id}/approve", headers=approver.headers,
                       json={"comment": "ship it"})  # fmt: skip
    assert r.status_code == 200, r.text
    r = await api.get(f"{URL}/{p['id']}", headers=editor.headers)
    assert r.json()["status"] == "approved" and r.json()["approved_by"] == [str(approver.user.id)]

    r = await api.post(f"{URL}/{p['id']}/execute", headers=editor.headers)
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["status"] == "deployed"
    dep = done["deployment"]
    assert dep["status"] == "deployed" and dep["rolled_back"] is False
    assert [s["step"] for s in dep["steps"]] == ["snapshot", "write", "publish", "verify",
                                                 "baseline"]  # fmt: skip
    [made] = prod.workflows.values()
    assert done["target_workflow_id"] == made["id"] and made["active"] is True
    slack = next(n for n in made["nodes"] if n["name"] == "Slack")
    assert slack["credentials"] == {CRED_TYPE: {"id": prod_cred["id"], "name": "Team Slack"}}
    assert promotions.marker_of(made) == p["lineage_id"]
    # The drift baseline is the deployed state; the lineage knows the target.
    baseline = await session.scalar(select(N8nBaseline).where(
        N8nBaseline.n8n_workflow_id == made["id"]))  # fmt: skip
    assert baseline is not None and str(baseline.snapshot_id) == dep["snapshot_id"]
    linked = await session.scalars(select(N8nLineage.n8n_workflow_id).where(
        N8nLineage.lineage_id == uuid.UUID(p["lineage_id"])))  # fmt: skip
    assert set(linked) == {wf["id"], made["id"]}
    # Executing twice: 409, nothing written again.
    writes = len([c for c in prod.calls if c.method in ("POST", "PUT")])
    r = await api.post(f"{URL}/{p['id']}/execute", headers=editor.headers)
    assert r.status_code == 409 and r.json()["promotion_status"] == "deployed"
    assert len([c for c in prod.calls if c.method in ("POST", "PUT")]) == writes
    r = await api.get("/api/v1/n8n/deployments", headers=editor.headers,
                      params={"environment": str(f.prod_env)})  # fmt: skip
    assert [d["id"] for d in r.json()["items"]] == [dep["id"]]
    r = await api.get("/api/v1/n8n/deployments", headers=editor.headers,
                      params={"environment": str(f.dev_env)})  # fmt: skip
    assert r.json()["total"] == 0

    # Update: the developer changes the text; the same target is found by lineage, its
    # node ids stay, the diff names the parameter.
    slack_node = next(n for n in dev.workflows[wf["id"]]["nodes"] if n["name"] == "Slack")
    slack_node["parameters"]["text"] = "hello, world"
    made_ids = {n["name"]: n["id"] for n in made["nodes"]}
    p2 = await plan(api, editor, plan_body(f, wf["id"]))
    assert (p2["action"], p2["matched_by"], p2["target_workflow_id"]) == (
        "update",
        "lineage",
        made["id"],
    )
    [change] = p2["plan"]["diff"]
    assert change["kind"] == "node_changed" and change["node"] == "Slack"
    assert change["changes"] == [{"path": "parameters.text", "change": "changed",
                                  "before": "hello", "after": "hello, world"}]  # fmt: skip
    r = await api.post(f"{URL}/{p2['id']}/approve", headers=approver.headers,
                       json={"comment": "ok"})  # fmt: skip
    assert r.status_code == 200 and r.json()["status"] == "approved", r.text
    r = await api.post(f"{URL}/{p2['id']}/execute", headers=editor.headers)
    assert r.status_code == 200 and r.json()["status"] == "deployed", r.text
    after = prod.workflows[made["id"]]
    assert {n["name"]: n["id"] for n in after["nodes"]} == made_ids
    assert next(n for n in after["nodes"] if n["name"] == "Slack")["parameters"]["text"] == (
        "hello, world"
    )
    pre = await session.get(N8nSnapshot, uuid.UUID(r.json()["deployment"]["pre_snapshot_id"]))
    assert pre is not None and pre.reason == "pre-promotion"
    assert pre.definition["nodes"]["Slack"]["parameters"]["text"] == "hello"
    # Lost lineage rows: the marker in the target's settings finds it again.
    await session.execute(delete(N8nLineage).where(N8nLineage.instance_id == uuid.UUID(
        f.prod_instance)))  # fmt: skip
    p3 = await plan(api, editor, plan_body(f, wf["id"]))
    assert (p3["matched_by"], p3["target_workflow_id"], p3["plan"]["diff"]) == (
        "marker",
        made["id"],
        [],
    )
    # Every step is in the activity log.
    actions = set(await session.scalars(select(ActivityLog.action).where(
        ActivityLog.workspace_id == team.id, ActivityLog.action.like("n8n.%"))))  # fmt: skip
    assert {"n8n.promotion.plan", "n8n.promotion.approved", "n8n.promotion.execute",
            "n8n.deployment.snapshot", "n8n.deployment.write", "n8n.deployment.publish",
            "n8n.deployment.verify", "n8n.deployment.baseline"} <= actions  # fmt: skip


async def test_missing_credentials_are_listed_and_block_execution(
    api: httpx.AsyncClient, session: AsyncSession, team: Workspace, editor: Actor,
    dev: StandIn, prod: StandIn,
) -> None:  # fmt: skip
    f = await fleet(api, session, editor, team, dev, prod)
    dev_cred = dev.add_credential("Team Slack", CRED_TYPE)
    prod.add_credential("team slack", CRED_TYPE)  # names match exactly, not loosely
    wf = slack_workflow(dev, dev_cred)
    p = await plan(api, editor, plan_body(f, wf["id"], min_success_rate=0))
    assert p["status"] == "blocked" and p["task_ids"] == []
    [missing] = p["plan"]["credentials"]["missing"]
    assert (missing["type"], missing["name"], missing["nodes"]) == (CRED_TYPE, "Team Slack",
                                                                    ["Slack"])  # fmt: skip
    assert gate(p, "credentials")["passed"] is False
    r = await api.post(f"{URL}/{p['id']}/execute", headers=editor.headers)
    assert r.status_code == 409 and r.json()["field"] == "credentials"
    assert r.json()["missing"][0]["name"] == "Team Slack"
    assert not prod.workflows and not [c for c in prod.calls if c.method == "POST"]
    # Never invented: no credential was created on the target.
    assert [c["name"] for c in prod.credentials.values()] == ["team slack"]
    # Two of the same name and type are ambiguous: missing too.
    prod.add_credential("Team Slack", CRED_TYPE)
    prod.add_credential("Team Slack", CRED_TYPE)
    p = await plan(api, editor, plan_body(f, wf["id"], min_success_rate=0))
    assert "2 slackApi credentials" in p["plan"]["credentials"]["missing"][0]["reason"]


async def test_a_key_that_cannot_list_credentials_maps_from_the_targets_workflows(
    api: httpx.AsyncClient, session: AsyncSession, team: Workspace, editor: Actor,
    dev: StandIn, prod: StandIn,
) -> None:  # fmt: skip
    f = await fleet(api, session, editor, team, dev, prod)
    dev_cred = dev.add_credential("Team Slack", CRED_TYPE)
    wf = slack_workflow(dev, dev_cred)
    prod.credential_list = False
    # Another workflow on production already uses a "Team Slack" credential.
    slack_workflow(prod, {"id": "prodcred1", "name": "Team Slack"}, active=False)
    await sync(api, editor, f.prod_instance)
    p = await plan(api, editor, plan_body(f, wf["id"], min_success_rate=0))
    creds = p["plan"]["credentials"]
    assert creds["source"] == "workflow_refs" and creds["missing"] == []
    assert creds["mapped"][0]["target_id"] == "prodcred1"
    assert p["status"] == "approved"  # no approvals asked for
    r = await api.post(f"{URL}/{p['id']}/execute", headers=editor.headers)
    assert r.status_code == 200, r.text
    made = prod.workflows[r.json()["target_workflow_id"]]
    assert next(n for n in made["nodes"] if n["name"] == "Slack")["credentials"][CRED_TYPE][
        "id"] == "prodcred1"  # fmt: skip


async def test_gates_success_rate_drift_and_hours_refuse_execution(
    api: httpx.AsyncClient, session: AsyncSession, team: Workspace, editor: Actor,
    dev: StandIn, prod: StandIn,
) -> None:  # fmt: skip
    f = await fleet(api, session, editor, team, dev, prod)
    wf = dev.add_workflow("Plain", nodes=2)
    for status in ("success", "error", "error", "success"):
        dev.add_execution(wf["id"], status)
    await sync(api, editor, f.dev_instance)
    # 50% < 90% (the default).
    p = await plan(api, editor, plan_body(f, wf["id"]))
    assert gate(p, "success_rate") == {**gate(p, "success_rate"), "passed": False, "rate": 50.0,
                                       "runs": 4, "threshold": 90.0}  # fmt: skip
    r = await api.post(f"{URL}/{p['id']}/execute", headers=editor.headers)
    assert r.status_code == 409 and [g["name"] for g in r.json()["gates"]] == ["success_rate"]
    assert not prod.workflows
    # A lower threshold per request passes; deploy so the target exists.
    p = await plan(api, editor, plan_body(f, wf["id"], min_success_rate=50))
    r = await api.post(f"{URL}/{p['id']}/execute", headers=editor.headers)
    assert r.status_code == 200, r.text
    target_id = r.json()["target_workflow_id"]
    # An open drift incident on the target workflow closes the drift gate.
    dev.workflows[wf["id"]]["name"] = "Plain v2"
    incident = N8nDriftIncident(id=uuid.uuid4(), workspace_id=team.id, environment_id=f.prod_env,
                                instance_id=uuid.UUID(f.prod_instance),
                                n8n_workflow_id=target_id, name="Plain",
                                kind="changed")  # fmt: skip
    session.add(incident)
    await session.flush()
    p = await plan(api, editor, plan_body(f, wf["id"], min_success_rate=0))
    assert gate(p, "no_open_drift")["incidents"] == [str(incident.id)]
    r = await api.post(f"{URL}/{p['id']}/execute", headers=editor.headers)
    assert r.status_code == 409 and [g["name"] for g in r.json()["gates"]] == ["no_open_drift"]
    assert prod.workflows[target_id]["name"] == "Plain"
    incident.status = "accepted"
    await session.flush()
    # Allowed hours: a window that excludes now.
    now = datetime.now(UTC)
    start = (now + timedelta(hours=2)).strftime("%H:%M")
    end = (now + timedelta(hours=3)).strftime("%H:%M")
    f.prod_row.allowed_hours = {"timezone": "UTC", "start": start, "end": end}
    await session.flush()
    r = await api.post(f"{URL}/{p['id']}/execute", headers=editor.headers)
    assert r.status_code == 409 and [g["name"] for g in r.json()["gates"]] == ["allowed_hours"]
    f.prod_row.allowed_hours = {}
    await session.flush()
    r = await api.post(f"{URL}/{p['id']}/execute", headers=editor.headers)
    assert r.status_code == 200 and prod.workflows[target_id]["name"] == "Plain v2", r.text


async def test_reject_and_two_approvals_by_distinct_people(
    api: httpx.AsyncClient, session: AsyncSession, settings: Settings, team: Workspace,
    editor: Actor, dev: StandIn, prod: StandIn,
) -> None:  # fmt: skip
    admin_a = await member(session, settings, team, Role.ADMINISTRATOR)
    admin_b = await member(session, settings, team, Role.ADMINISTRATOR)
    viewer = await member(session, settings, team, Role.VIEWER)
    for actor in (admin_a, admin_b, viewer):
        actor.headers["X-Workspace-ID"] = str(team.id)
    policy = {"min_approvals": 2, "approver_min_role": "administrator"}
    f = await fleet(api, session, editor, team, dev, prod, approvals=policy)
    wf = dev.add_workflow("Two keys", nodes=2)
    p = await plan(api, editor, plan_body(f, wf["id"], min_success_rate=0))
    assert len(p["task_ids"]) == 2
    r = await api.post(f"{URL}/{p['id']}/approve", headers=viewer.headers)
    assert r.status_code == 403
    r = await api.post(f"{URL}/{p['id']}/approve", headers=admin_a.headers)
    assert r.status_code == 200 and r.json()["status"] == "awaiting_approval"
    assert gate(r.json(), "approvals")["approved"] == 1
    r = await api.post(f"{URL}/{p['id']}/approve", headers=admin_a.headers)
    assert r.status_code == 409 and r.json()["field"] == "approved_by"
    r = await api.post(f"{URL}/{p['id']}/approve", headers=admin_b.headers)
    assert r.status_code == 200 and r.json()["status"] == "approved"
    assert sorted(r.json()["approved_by"]) == sorted([str(admin_a.user.id), str(admin_b.user.id)])
    # One person approving both tasks in the inbox counts once: a task is opened for the
    # approval still wanting, and someone else's approval completes it.
    p = await plan(api, editor, plan_body(f, wf["id"], min_success_rate=0))
    for task_id in p["task_ids"]:
        r = await api.post(f"/api/v1/tasks/{task_id}/approve", headers=admin_a.headers)
        assert r.status_code == 200, r.text
    r = await api.get(f"{URL}/{p['id']}", headers=editor.headers)
    assert r.json()["status"] == "awaiting_approval" and len(r.json()["task_ids"]) == 3
    assert r.json()["approved_by"] == [str(admin_a.user.id)]
    r = await api.post(f"{URL}/{p['id']}/approve", headers=admin_b.headers)
    assert r.status_code == 200 and r.json()["status"] == "approved", r.text
    # A rejection (here in the inbox) rejects; execute is refused.
    p = await plan(api, editor, plan_body(f, wf["id"], min_success_rate=0))
    r = await api.post(f"/api/v1/tasks/{p['task_ids'][1]}/reject", headers=admin_b.headers,
                       json={"comment": "not on a Friday"})  # fmt: skip
    assert r.status_code == 200
    r = await api.get(f"{URL}/{p['id']}", headers=editor.headers)
    assert r.json()["status"] == "rejected"
    assert r.json()["decision_comment"] == "not on a Friday"
    r = await api.post(f"{URL}/{p['id']}/approve", headers=admin_a.headers)
    assert r.status_code == 409
    r = await api.post(f"{URL}/{p['id']}/execute", headers=editor.headers)
    assert r.status_code == 409 and not prod.workflows
    r = await api.get(URL, headers=editor.headers, params={"status": "rejected"})
    assert [i["id"] for i in r.json()["items"]] == [p["id"]]


async def test_a_failed_publish_rolls_the_target_back(
    api: httpx.AsyncClient, session: AsyncSession, team: Workspace, editor: Actor,
    dev: StandIn, prod: StandIn,
) -> None:  # fmt: skip
    f = await fleet(api, session, editor, team, dev, prod)
    wf = dev.add_workflow("Fragile", active=True, nodes=2)
    # Create path: the publish fails after the write; the created workflow is deleted.
    prod.route_faults.append(("POST", "/publish", 400))
    p = await plan(api, editor, plan_body(f, wf["id"], min_success_rate=0))
    r = await api.post(f"{URL}/{p['id']}/execute", headers=editor.headers)
    assert r.status_code == 502, r.text
    assert r.json()["deployment_status"] == "rolled_back"
    assert not prod.workflows
    r = await api.get(f"{URL}/{p['id']}", headers=editor.headers)
    dep = r.json()["deployment"]
    assert r.json()["status"] == "rolled_back" and dep["rolled_back"] is True
    assert [(s["step"], s["ok"]) for s in dep["steps"]] == [
        ("snapshot", True), ("write", True), ("publish", False), ("rollback", True)]  # fmt: skip
    r = await api.post(f"{URL}/{p['id']}/execute", headers=editor.headers)
    assert r.status_code == 409
    # Update path: deploy once, then a change whose publish fails is put back exactly.
    p = await plan(api, editor, plan_body(f, wf["id"], min_success_rate=0))
    r = await api.post(f"{URL}/{p['id']}/execute", headers=editor.headers)
    assert r.status_code == 200, r.text
    target_id = r.json()["target_workflow_id"]
    before = {k: prod.workflows[target_id][k] for k in ("name", "nodes", "connections")}
    dev.workflows[wf["id"]]["nodes"][1]["parameters"] = {"value": "changed"}
    p = await plan(api, editor, plan_body(f, wf["id"], min_success_rate=0))
    prod.route_faults.append(("POST", "/publish", 400))
    r = await api.post(f"{URL}/{p['id']}/execute", headers=editor.headers)
    assert r.status_code == 502 and "put back" in r.json()["detail"], r.text
    now = prod.workflows[target_id]
    assert {k: now[k] for k in ("name", "nodes", "connections")} == before
    assert now["active"] is True
    r = await api.get("/api/v1/n8n/deployments", headers=editor.headers,
                      params={"environment": str(f.prod_env)})  # fmt: skip
    assert [d["status"] for d in r.json()["items"]] == ["rolled_back", "deployed", "rolled_back"]
    # When the rollback fails too, the deployment says `failed` and which step.
    other = dev.add_workflow("Fragile too", active=True, nodes=1)
    prod.route_faults.extend([("POST", "/publish", 400), ("DELETE", "", 400)])
    p = await plan(api, editor, plan_body(f, other["id"], min_success_rate=0))
    r = await api.post(f"{URL}/{p['id']}/execute", headers=editor.headers)
    assert r.status_code == 502 and "rollback failed too" in r.json()["detail"], r.text
    assert r.json()["deployment_status"] == "failed"
    dep = (await api.get(f"{URL}/{p['id']}", headers=editor.headers)).json()["deployment"]
    assert (dep["status"], dep["rolled_back"]) == ("failed", False)
    assert dep["steps"][-1]["step"] == "rollback" and dep["steps"][-1]["ok"] is False
    leftover = [w for w in prod.workflows.values() if w["name"] == "Fragile too"]
    assert len(leftover) == 1 and dep["n8n_workflow_id"] == leftover[0]["id"]
    # A target edited by hand since the plan: refused, nothing written.
    p = await plan(api, editor, plan_body(f, wf["id"], min_success_rate=0))
    prod.workflows[target_id]["name"] = "edited by hand"
    puts = len([c for c in prod.calls if c.method == "PUT"])
    r = await api.post(f"{URL}/{p['id']}/execute", headers=editor.headers)
    assert r.status_code == 409 and "changed since the plan" in r.json()["detail"]
    assert len([c for c in prod.calls if c.method == "PUT"]) == puts
    r = await api.get(f"{URL}/{p['id']}", headers=editor.headers)
    assert r.json()["status"] == "approved" and r.json()["deployment"] is None


@pytest.mark.parametrize(
    ("change", "status", "field"),
    [
        ({"from_env": "nope"}, 422, "from_env"),
        ({"workflow": {"instance_id": "x", "n8n_workflow_id": "wf1"}}, 422, "workflow.instance_id"),
        ({"workflow": {"n8n_workflow_id": "../../etc"}}, 422, "workflow.n8n_workflow_id"),
        ({"min_success_rate": 101}, 422, "min_success_rate"),
        ({"min_success_rate": -1}, 422, "min_success_rate"),
        ({"target_workflow_id": "a/b"}, 422, "target_workflow_id"),
        ({"note": "x" * 2001}, 422, "note"),
        ({"extra": 1}, 422, "extra"),
        ({"to_env": "same"}, 422, "to_env"),
        ({"to_env": "reverse"}, 409, "to_env"),
        ({"to_env": str(uuid.uuid4())}, 404, "to_env"),
        ({"workflow": {"n8n_workflow_id": "wf404"}}, 404, "workflow.n8n_workflow_id"),
        ({"workflow": {"instance_id": "prod"}}, 422, "workflow.instance_id"),
    ],
)
async def test_bad_input_is_refused_with_the_field(
    api: httpx.AsyncClient, session: AsyncSession, team: Workspace, editor: Actor,
    dev: StandIn, prod: StandIn, change: dict[str, Any], status: int, field: str,
) -> None:  # fmt: skip
    f = await fleet(api, session, editor, team, dev, prod)
    wf = dev.add_workflow("Any", nodes=1)
    body = plan_body(f, wf["id"])
    for key, value in change.items():
        if key == "workflow":
            body["workflow"] = {**body["workflow"], **value}
            if value.get("instance_id") == "prod":
                body["workflow"]["instance_id"] = f.prod_instance
        elif value == "same":
            body["to_env"] = body["from_env"]
        elif value == "reverse":
            body["from_env"], body["to_env"] = body["to_env"], body["from_env"]
            body["workflow"]["instance_id"] = f.prod_instance
        else:
            body[key] = value
    r = await api.post(URL, headers=editor.headers, json=body)
    assert r.status_code == status, r.text
    got = r.json().get("field") or r.json()["fields"][0]["field"]
    assert str(got).startswith(field), r.text
    r = await api.get(URL, headers=editor.headers)
    assert r.json()["total"] == 0


async def test_other_workspaces_and_viewers_are_refused(
    api: httpx.AsyncClient, session: AsyncSession, settings: Settings, team: Workspace,
    editor: Actor, dev: StandIn, prod: StandIn,
) -> None:  # fmt: skip
    f = await fleet(api, session, editor, team, dev, prod)
    wf = dev.add_workflow("Mine", nodes=1)
    p = await plan(api, editor, plan_body(f, wf["id"], min_success_rate=0))
    other = await make_workspace(session, "Other")
    stranger = await member(session, settings, other, Role.OWNER)
    stranger.headers["X-Workspace-ID"] = str(other.id)
    for method, path in (("GET", ""), ("POST", "/approve"), ("POST", "/reject"),
                         ("POST", "/execute")):  # fmt: skip
        r = await api.request(method, f"{URL}/{p['id']}{path}", headers=stranger.headers)
        assert r.status_code == 404, (path, r.text)
    r = await api.get(URL, headers=stranger.headers)
    assert r.json()["total"] == 0
    r = await api.get("/api/v1/n8n/deployments", headers=stranger.headers)
    assert r.json()["total"] == 0
    # Someone else's environments cannot be named from here.
    r = await api.post(URL, headers=stranger.headers, json=plan_body(f, wf["id"]))
    assert r.status_code == 404
    viewer = await member(session, settings, team, Role.VIEWER)
    viewer.headers["X-Workspace-ID"] = str(team.id)
    r = await api.post(URL, headers=viewer.headers, json=plan_body(f, wf["id"]))
    assert r.status_code == 403
    r = await api.post(f"{URL}/{p['id']}/execute", headers=viewer.headers)
    assert r.status_code == 403
    assert not prod.workflows
    tasks = await session.scalars(select(Task).where(Task.workspace_id == other.id))
    assert list(tasks) == []


async def test_the_routes_are_in_openapi(api: httpx.AsyncClient) -> None:
    paths = (await api.get("/openapi.json")).json()["paths"]
    for path in ("/api/v1/n8n/promotions", "/api/v1/n8n/promotions/{promotion_id}",
                 "/api/v1/n8n/promotions/{promotion_id}/approve",
                 "/api/v1/n8n/promotions/{promotion_id}/reject",
                 "/api/v1/n8n/promotions/{promotion_id}/execute",
                 "/api/v1/n8n/deployments"):  # fmt: skip
        assert path in paths


async def test_hostile_ids_and_what_n8n_holds_are_refused_clearly(
    api: httpx.AsyncClient, session: AsyncSession, team: Workspace, editor: Actor,
    dev: StandIn, prod: StandIn,
) -> None:  # fmt: skip
    f = await fleet(api, session, editor, team, dev, prod)
    for path in (f"{URL}/not-a-uuid", f"{URL}/{uuid.uuid4()}", f"{URL}/%00/approve"):
        r = await api.get(path, headers=editor.headers)
        assert r.status_code in (404, 405, 422), (path, r.text)
    r = await api.post(f"{URL}/{uuid.uuid4()}/execute", headers=editor.headers)
    assert r.status_code == 404
    for params in ({"environment": "x"}, {"lineage_id": "1; drop table"}, {"limit": "-1"}):
        r = await api.get("/api/v1/n8n/deployments", headers=editor.headers, params=params)
        assert r.status_code == 422, (params, r.text)
    r = await api.get(URL, headers=editor.headers, params={"status": "deployed' or 1=1"})
    assert r.status_code == 422
    r = await api.post(f"{URL}/{uuid.uuid4()}/approve", headers=editor.headers,
                       json={"comment": "x" * 10_001})  # fmt: skip
    assert r.status_code in (404, 422)
    # A NUL in what n8n holds (PostgreSQL cannot store it): a clear 422, nothing stored.
    wf = dev.add_workflow("Nul", nodes=2)
    wf["nodes"][1]["parameters"] = {"value": "a\x00b"}
    r = await api.post(URL, headers=editor.headers, json=plan_body(f, wf["id"]))
    assert r.status_code == 422 and r.json()["field"] == "workflow.n8n_workflow_id", r.text
    # n8n down at plan time: 502 with its reason, nothing stored.
    prod.faults.extend([503, 503, 503, 503])
    ok = dev.add_workflow("Fine", nodes=1)
    r = await api.post(URL, headers=editor.headers, json=plan_body(f, ok["id"]))
    assert r.status_code == 502, r.text
    r = await api.get(URL, headers=editor.headers)
    assert r.json()["total"] == 0
    # Deployments filtered by lineage.
    p = await plan(api, editor, plan_body(f, ok["id"], min_success_rate=0))
    r = await api.post(f"{URL}/{p['id']}/execute", headers=editor.headers)
    assert r.status_code == 200, r.text
    r = await api.get("/api/v1/n8n/deployments", headers=editor.headers,
                      params={"lineage_id": p["lineage_id"]})  # fmt: skip
    assert r.json()["total"] == 1
    r = await api.get("/api/v1/n8n/deployments", headers=editor.headers,
                      params={"lineage_id": str(uuid.uuid4())})  # fmt: skip
    assert r.json()["total"] == 0


async def test_a_credential_renamed_on_the_source_is_matched_by_its_current_name(
    api: httpx.AsyncClient, session: AsyncSession, team: Workspace, editor: Actor,
    dev: StandIn, prod: StandIn,
) -> None:  # fmt: skip
    f = await fleet(api, session, editor, team, dev, prod)
    dev_cred = dev.add_credential("Team Slack", CRED_TYPE)
    prod_cred = prod.add_credential("Team Slack", CRED_TYPE)
    prod.add_credential("Old Slack", CRED_TYPE)  # the stale name must not win
    # The node still carries the name the credential had when it was picked.
    wf = slack_workflow(dev, {"id": dev_cred["id"], "name": "Old Slack"})
    p = await plan(api, editor, plan_body(f, wf["id"], min_success_rate=0))
    [mapped] = p["plan"]["credentials"]["mapped"]
    assert (mapped["name"], mapped["target_id"]) == ("Team Slack", prod_cred["id"])
    r = await api.post(f"{URL}/{p['id']}/execute", headers=editor.headers)
    assert r.status_code == 200, r.text
    made = prod.workflows[r.json()["target_workflow_id"]]
    slack = next(n for n in made["nodes"] if n["name"] == "Slack")
    assert slack["credentials"][CRED_TYPE] == {"id": prod_cred["id"], "name": "Team Slack"}
