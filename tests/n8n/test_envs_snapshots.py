"""n8n environments, pipelines and snapshots against the loopback stand-in: policies
(protected: toggle refused 409; approvers must be members; hours), pipelines in order,
snapshots normalised (ids and positions do not change the digest), diffs with parameter
paths, restore (snapshot first, published again), export as a zip, nightly snapshots only
on change, and hostile input (422 naming the field; other workspaces' ids 404)."""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.permissions import Role
from backend.config import Settings
from backend.models import ActivityLog, N8nEnvironment, N8nInstance, N8nSnapshot, Workspace
from backend.n8n import environments, snapshot_ops, snapshots
from tests.n8n.standin import StandIn
from tests.support.identity import Actor, make_workspace, member

N8N = "/api/v1/n8n"


async def connect(api: httpx.AsyncClient, actor: Actor, standin: StandIn) -> str:
    body = {"name": f"n8n-{uuid.uuid4().hex[:6]}", "base_url": standin.base,
            "api_key": standin.api_key}  # fmt: skip
    r = await api.post(f"{N8N}/instances", headers=actor.headers, json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def admin_of(session: AsyncSession, settings: Settings, team: Workspace) -> Actor:
    actor = await member(session, settings, team, Role.ADMINISTRATOR)
    actor.headers["X-Workspace-ID"] = str(team.id)
    return actor


async def make_env(
    api: httpx.AsyncClient, admin: Actor, iid: str, stage: str, **extra: Any
) -> dict[str, Any]:
    r = await api.post(f"{N8N}/environments", headers=admin.headers,
                       json={"instance_id": iid, "stage": stage, **extra})  # fmt: skip
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def field_of(r: httpx.Response) -> str:
    body = r.json()
    return str(body.get("field") or body["fields"][0]["field"])


def edited(standin: StandIn, wid: str, **params: Any) -> None:
    """A hand edit on the instance: a parameter of the second node, new version id."""
    node = standin.workflows[wid]["nodes"][1]
    node["parameters"] = {**node["parameters"], **params}
    standin.workflows[wid]["versionId"] = f"v-{uuid.uuid4().hex[:8]}"


# Normalising ------------------------------------------------------------------------------


def test_ids_positions_and_order_do_not_change_the_digest() -> None:
    node = {"id": "a", "name": "Fetch", "type": "n8n-nodes-base.httpRequest", "typeVersion": 4.2,
            "position": [0, 0], "parameters": {"url": "https://x.example", "options": {}},
            "credentials": {"httpBasicAuth": {"id": "7", "name": "Basic"}}}  # fmt: skip
    hook = {"id": "b", "name": "Hook", "type": "n8n-nodes-base.webhook", "typeVersion": 2,
            "position": [1, 1], "webhookId": "w1", "parameters": {"path": "p"}}  # fmt: skip
    one = {"name": "W", "nodes": [node, hook], "versionId": "v1", "id": "1",
           "connections": {"Hook": {"main": [[{"node": "Fetch", "type": "main", "index": 0}]]}},
           "settings": {"executionOrder": "v1", "binaryMode": "separate"}}  # fmt: skip
    two = {**one, "id": "2", "versionId": "v9",
           "nodes": [{**hook, "id": "x", "position": [9, 9], "webhookId": "w2"},
                     {**node, "id": "y", "credentials": {"httpBasicAuth": {"id": "99",
                                                                          "name": "Basic"}}}],
           "connections": {"Hook": {"main": [[{"node": "Fetch", "type": "main", "index": 0}],
                                             []]}},
           "settings": {"executionOrder": "v1"}}  # fmt: skip
    a, b = snapshots.normalise(one), snapshots.normalise(two)
    assert a == b and snapshots.digest(a) == snapshots.digest(b)
    assert "id" not in a["nodes"]["Fetch"] and "position" not in a["nodes"]["Hook"]
    assert a["nodes"]["Fetch"]["credentials"] == {"httpBasicAuth": {"name": "Basic"}}
    # A parameter change is a different digest, and the diff names its path.
    three = {
        **one,
        "nodes": [
            {**node, "parameters": {"url": "https://y.example", "options": {"timeout": 5}}},
            hook,
        ],
    }
    c = snapshots.normalise(three)
    assert snapshots.digest(c) != snapshots.digest(a)
    changes = snapshots.diff(a, c)
    assert changes == [
        {
            "kind": "node_changed",
            "node": "Fetch",
            "type": "n8n-nodes-base.httpRequest",
            "changes": [
                {"path": "parameters.options.timeout", "change": "added", "after": 5},
                {
                    "path": "parameters.url",
                    "change": "changed",
                    "before": "https://x.example",
                    "after": "https://y.example",
                },
            ],
        }
    ]
    # Added/removed nodes, connections and settings.
    four = {**one, "nodes": [node], "connections": {}, "settings": {"executionOrder": "v0"}}
    kinds = [
        (c["kind"], c.get("node") or c.get("path"))
        for c in snapshots.diff(a, snapshots.normalise(four))
    ]
    assert kinds == [("node_removed", "Hook"), ("connections_changed", "Hook"),
                     ("settings_changed", "executionOrder")]  # fmt: skip
    # Back to n8n: the snapshot's own ids and positions, credential ids by type and name.
    body = snapshots.to_n8n(a, snapshots.references(one))
    fetch = next(n for n in body["nodes"] if n["name"] == "Fetch")
    assert fetch["id"] == "a" and fetch["position"] == [0, 0]
    assert fetch["credentials"] == {"httpBasicAuth": {"id": "7", "name": "Basic"}}
    assert set(body["settings"]) == {"executionOrder"}


def test_allowed_hours_across_midnight_and_days() -> None:
    env = N8nEnvironment(
        stage="production",
        allowed_hours={
            "timezone": "Europe/Berlin",
            "days": [0, 1, 2, 3, 4],
            "start": "22:00",
            "end": "02:00",
        },
    )
    # Monday 2026-11-30 21:30 UTC = 22:30 Berlin: inside.
    assert environments.within_hours(env, datetime(2026, 11, 30, 21, 30, tzinfo=UTC))
    # Saturday 00:30 Berlin belongs to Friday's window: inside.
    assert environments.within_hours(env, datetime(2026, 12, 4, 23, 30, tzinfo=UTC))
    # Sunday 00:30 Berlin belongs to Saturday: outside; noon: outside.
    assert not environments.within_hours(env, datetime(2026, 12, 5, 23, 30, tzinfo=UTC))
    assert not environments.within_hours(env, datetime(2026, 11, 30, 11, 0, tzinfo=UTC))
    with pytest.raises(environments.OutsideAllowedHours):
        environments.check_hours(env, datetime(2026, 11, 30, 11, 0, tzinfo=UTC))
    assert environments.within_hours(N8nEnvironment(stage="dev", allowed_hours={}))


def test_who_may_approve() -> None:
    someone, other = uuid.uuid4(), uuid.uuid4()
    env = N8nEnvironment(stage="p", approvals={"min_approvals": 1, "approver_ids": [str(someone)],
                                               "approver_min_role": "owner"})  # fmt: skip
    assert environments.may_approve(env, someone, Role.VIEWER)
    assert not environments.may_approve(env, other, Role.ADMINISTRATOR)
    assert environments.may_approve(env, other, Role.OWNER)
    default = N8nEnvironment(stage="p", approvals={"min_approvals": 1})
    assert environments.may_approve(default, other, Role.ADMINISTRATOR)
    assert not environments.may_approve(default, other, Role.EDITOR)
    assert environments.approvals_needed(env) == 1


# Environments and pipelines ---------------------------------------------------------------


async def test_environments_policies_and_pipelines(
    api: httpx.AsyncClient, editor: Actor, standin: StandIn, session: AsyncSession,
    settings: Settings, team: Workspace,
) -> None:  # fmt: skip
    admin = await admin_of(session, settings, team)
    dev_i, stg_i, prd_i = [await connect(api, admin, standin) for _ in range(3)]
    # Editors cannot set policy.
    r = await api.post(f"{N8N}/environments", headers=editor.headers,
                       json={"instance_id": dev_i, "stage": "dev"})  # fmt: skip
    assert r.status_code == 403
    dev = await make_env(api, admin, dev_i, "dev")
    stg = await make_env(api, admin, stg_i, "staging", drift_policy="accept")
    prd = await make_env(api, admin, prd_i, "production", protected=True,
                         approvals={"min_approvals": 2, "approver_ids": [str(admin.user.id)],
                                    "approver_min_role": "owner"},
                         allowed_hours={"timezone": "Europe/Berlin", "days": [0, 1, 2, 3, 4],
                                        "start": "09:00", "end": "17:00"})  # fmt: skip
    assert prd["protected"] is True and prd["approvals"]["min_approvals"] == 2
    assert prd["allowed_hours"]["timezone"] == "Europe/Berlin" and dev["allowed_hours"] is None
    assert dev["drift_policy"] == "notify" and stg["drift_policy"] == "accept"
    # One environment per instance.
    r = await api.post(f"{N8N}/environments", headers=admin.headers,
                       json={"instance_id": dev_i, "stage": "qa"})  # fmt: skip
    assert r.status_code == 409 and r.json()["field"] == "instance_id"
    r = await api.get(f"{N8N}/environments", headers=editor.headers, params={"stage": "production"})
    assert [e["id"] for e in r.json()] == [prd["id"]]
    # The pipeline, in order, with each stage named.
    ids = [dev["id"], stg["id"], prd["id"]]
    r = await api.post(f"{N8N}/pipelines", headers=admin.headers,
                       json={"name": "main", "environment_ids": ids})  # fmt: skip
    assert r.status_code == 201, r.text
    pipe = r.json()
    assert [s["stage"] for s in pipe["stages"]] == ["dev", "staging", "production"]
    assert pipe["stages"][2]["protected"] is True
    r = await api.post(f"{N8N}/pipelines", headers=admin.headers,
                       json={"name": "main", "environment_ids": ids[:1]})  # fmt: skip
    assert r.status_code == 409 and r.json()["field"] == "name"
    r = await api.patch(f"{N8N}/pipelines/{pipe['id']}", headers=admin.headers,
                        json={"environment_ids": [ids[0], ids[2]]})  # fmt: skip
    assert [s["stage"] for s in r.json()["stages"]] == ["dev", "production"]
    r = await api.get(f"{N8N}/pipelines", headers=editor.headers)
    assert r.json()["total"] == 1
    # Deleting an environment takes it out of the pipeline.
    r = await api.delete(f"{N8N}/environments/{dev['id']}", headers=admin.headers)
    assert r.status_code == 204
    r = await api.get(f"{N8N}/pipelines/{pipe['id']}", headers=editor.headers)
    assert [s["stage"] for s in r.json()["stages"]] == ["production"]
    # Patch: hours lifted with null, stage renamed; logged.
    r = await api.patch(f"{N8N}/environments/{prd['id']}", headers=admin.headers,
                        json={"allowed_hours": None, "stage": "prod-eu"})  # fmt: skip
    assert r.status_code == 200 and r.json()["allowed_hours"] is None
    assert r.json()["stage"] == "prod-eu"
    actions = set((await session.scalars(
        select(ActivityLog.action).where(ActivityLog.workspace_id == team.id))).all())  # fmt: skip
    assert {"n8n.environment.create", "n8n.environment.update", "n8n.environment.delete",
            "n8n.pipeline.create", "n8n.pipeline.update"} <= actions  # fmt: skip
    r = await api.delete(f"{N8N}/pipelines/{pipe['id']}", headers=admin.headers)
    assert r.status_code == 204
    # A pipeline whose last environment is deleted goes with it (none can be empty).
    r = await api.post(f"{N8N}/pipelines", headers=admin.headers,
                       json={"name": "solo", "environment_ids": [prd["id"]]})  # fmt: skip
    assert r.status_code == 201, r.text
    solo = r.json()["id"]
    assert (
        await api.delete(f"{N8N}/environments/{prd['id']}", headers=admin.headers)
    ).status_code == 204
    assert (await api.get(f"{N8N}/pipelines/{solo}", headers=editor.headers)).status_code == 404
    # Deleting an instance deletes its environment: out of the pipelines as well.
    r = await api.post(f"{N8N}/pipelines", headers=admin.headers,
                       json={"name": "staging only", "environment_ids": [stg["id"]]})  # fmt: skip
    assert r.status_code == 201, r.text
    staged = r.json()["id"]
    r = await api.delete(f"{N8N}/instances/{stg_i}", headers=admin.headers)
    assert r.status_code == 204, r.text
    assert (await api.get(f"{N8N}/pipelines/{staged}", headers=editor.headers)).status_code == 404


async def test_a_protected_environment_refuses_toggles_and_editor_restores(
    api: httpx.AsyncClient, editor: Actor, standin: StandIn, session: AsyncSession,
    settings: Settings, team: Workspace,
) -> None:  # fmt: skip
    admin = await admin_of(session, settings, team)
    wf = standin.add_workflow("Orders", active=True)
    iid = await connect(api, admin, standin)
    await api.post(f"{N8N}/instances/{iid}/refresh", headers=admin.headers)
    env = await make_env(api, admin, iid, "production", protected=True)
    r = await api.post(f"{N8N}/instances/{iid}/workflows/{wf['id']}/toggle",
                       headers=admin.headers, json={"active": False})  # fmt: skip
    assert r.status_code == 409 and r.json()["error"] == "environment_protected", r.text
    assert standin.workflows[wf["id"]]["active"] is True
    assert not any(c.path.endswith("/unpublish") for c in standin.calls)
    # Installing the error workflow edits workflows: refused too, nothing sent to n8n.
    r = await api.post(f"{N8N}/instances/{iid}/install-error-workflow", headers=admin.headers,
                       json={"all_workflows": True})  # fmt: skip
    assert r.status_code == 409 and r.json()["error"] == "environment_protected", r.text
    assert not any(c.method == "PUT" or (c.path.endswith("/workflows") and c.method == "POST")
                   for c in standin.calls)  # fmt: skip
    # A snapshot may be taken by an editor; a restore there takes an administrator.
    r = await api.post(f"{N8N}/instances/{iid}/workflows/{wf['id']}/snapshots",
                       headers=editor.headers)  # fmt: skip
    assert r.status_code == 201
    sid = r.json()["id"]
    r = await api.post(f"{N8N}/snapshots/{sid}/restore", headers=editor.headers)
    assert r.status_code == 403 and r.json()["error"] == "permission_denied"
    # Outside the allowed hours even an administrator waits (the window is an hour
    # that never is now).
    now = datetime.now(UTC)
    start = f"{(now.hour + 2) % 24:02d}:00"
    end = f"{(now.hour + 3) % 24:02d}:00"
    await api.patch(
        f"{N8N}/environments/{env['id']}",
        headers=admin.headers,
        json={"allowed_hours": {"timezone": "UTC", "start": start, "end": end}},
    )
    r = await api.post(f"{N8N}/snapshots/{sid}/restore", headers=admin.headers)
    assert r.status_code == 409 and r.json()["error"] == "outside_allowed_hours"
    # Unprotected, the toggle goes through.
    await api.patch(f"{N8N}/environments/{env['id']}", headers=admin.headers,
                    json={"protected": False})  # fmt: skip
    r = await api.post(f"{N8N}/instances/{iid}/workflows/{wf['id']}/toggle",
                       headers=admin.headers, json={"active": False})  # fmt: skip
    assert r.status_code == 200 and standin.workflows[wf["id"]]["active"] is False


# Snapshots --------------------------------------------------------------------------------


async def test_snapshots_diff_and_restore(
    api: httpx.AsyncClient, editor: Actor, standin: StandIn, session: AsyncSession
) -> None:
    wf = standin.add_workflow("Invoices", active=True, nodes=3)
    wid = wf["id"]
    iid = await connect(api, editor, standin)
    url = f"{N8N}/instances/{iid}/workflows/{wid}/snapshots"
    r = await api.post(url, headers=editor.headers, json={"note": "before the change"})
    assert r.status_code == 201, r.text
    first = r.json()
    assert first["reason"] == "manual" and first["by_user_id"] == str(editor.user.id)
    assert first["active"] is True and first["node_count"] == 3 and len(first["digest"]) == 64
    assert set(first["definition"]) == {"name", "nodes", "connections", "settings"}
    assert set(first["definition"]["nodes"]) == {"Webhook", "Step 1", "Step 2"}
    # The same definition again: the same digest.
    r = await api.post(url, headers=editor.headers)
    assert r.json()["digest"] == first["digest"]
    # A hand edit in n8n, then a snapshot: the diff names the node and the path.
    edited(standin, wid, url="https://evil.example")
    standin.workflows[wid]["nodes"][0]["position"] = [999, 999]
    r = await api.post(url, headers=editor.headers)
    second = r.json()
    assert second["digest"] != first["digest"]
    r = await api.get(f"{N8N}/snapshots/{first['id']}/diff/{second['id']}", headers=editor.headers)
    assert r.status_code == 200
    out = r.json()
    assert out["same"] is False
    assert out["changes"] == [{"kind": "node_changed", "node": "Step 1",
                               "type": "n8n-nodes-base.set",
                               "changes": [{"path": "parameters.url", "change": "added",
                                            "after": "https://evil.example"}]}]  # fmt: skip
    r = await api.get(url, headers=editor.headers)
    assert r.json()["total"] == 3 and r.json()["items"][0]["id"] == second["id"]
    # Restore the first: what is there is snapshotted first; PUT; published again.
    standin.calls.clear()
    r = await api.post(f"{N8N}/snapshots/{first['id']}/restore", headers=editor.headers)
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["before"]["digest"] == second["digest"]
    assert done["before"]["reason"] == "pre-restore" and done["after"]["reason"] == "restore"
    assert done["after"]["digest"] == first["digest"] and done["active"] is True
    assert "url" not in standin.workflows[wid]["nodes"][1]["parameters"]
    # The node keeps its id and its position from the snapshot.
    assert standin.workflows[wid]["nodes"][0]["id"] == f"{wid}-n0"
    assert standin.workflows[wid]["nodes"][0]["position"] == [0, 0]
    methods = [(c.method, c.path.rsplit("/", 1)[-1]) for c in standin.calls]
    assert ("PUT", wid) in methods and ("POST", "publish") in methods
    assert methods.index(("PUT", wid)) < methods.index(("POST", "publish"))
    # Snapshots are never changed by a restore.
    row = await session.get(N8nSnapshot, uuid.UUID(first["id"]))
    assert row is not None and row.reason == "manual" and row.digest == first["digest"]


async def test_restore_of_a_deleted_workflow_creates_it_again(
    api: httpx.AsyncClient, editor: Actor, standin: StandIn
) -> None:
    wf = standin.add_workflow("Gone soon")
    iid = await connect(api, editor, standin)
    r = await api.post(f"{N8N}/instances/{iid}/workflows/{wf['id']}/snapshots",
                       headers=editor.headers)  # fmt: skip
    sid = r.json()["id"]
    del standin.workflows[wf["id"]]
    r = await api.post(f"{N8N}/snapshots/{sid}/restore", headers=editor.headers)
    assert r.status_code == 200, r.text
    new_id = r.json()["n8n_workflow_id"]
    assert new_id != wf["id"] and standin.workflows[new_id]["name"] == "Gone soon"
    assert r.json()["before"] is None and r.json()["active"] is False


async def test_snapshot_of_an_unknown_workflow_and_unreachable_instance(
    api: httpx.AsyncClient, editor: Actor, standin: StandIn
) -> None:
    iid = await connect(api, editor, standin)
    r = await api.post(f"{N8N}/instances/{iid}/workflows/nope/snapshots", headers=editor.headers)
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    wf = standin.add_workflow("W")
    standin.faults += [500, 500, 500]
    r = await api.post(f"{N8N}/instances/{iid}/workflows/{wf['id']}/snapshots",
                       headers=editor.headers)  # fmt: skip
    assert r.status_code == 502 and r.json()["error"] == "upstream_error"


async def test_export_is_a_zip_of_every_workflow(
    api: httpx.AsyncClient, editor: Actor, standin: StandIn, session: AsyncSession,
    settings: Settings, team: Workspace,
) -> None:  # fmt: skip
    admin = await admin_of(session, settings, team)
    a = standin.add_workflow("A", active=True)
    b = standin.add_workflow("B")
    iid = await connect(api, admin, standin)
    env = await make_env(api, admin, iid, "staging")
    r = await api.get(f"{N8N}/environments/{env['id']}/export", headers=editor.headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    assert "n8n-staging-" in r.headers["content-disposition"]
    archive = zipfile.ZipFile(io.BytesIO(r.content))
    names = sorted(archive.namelist())
    assert names == ["manifest.json", f"workflows/{a['id']}.json", f"workflows/{b['id']}.json"]
    manifest = json.loads(archive.read("manifest.json"))
    assert manifest["environment"]["stage"] == "staging"
    assert [w["name"] for w in manifest["workflows"]] == ["A", "B"]
    one = json.loads(archive.read(f"workflows/{a['id']}.json"))
    assert one["active"] is True
    assert one["digest"] == snapshots.digest(snapshots.normalise(standin.workflows[a["id"]]))
    assert {n["name"] for n in one["n8n"]["nodes"]} == {"Webhook", "Step 1"}
    assert standin.api_key not in r.text


async def test_nightly_snapshots_only_when_the_hash_changed(
    standin: StandIn, session: AsyncSession, local: Settings, team: Workspace, editor: Actor,
    api: httpx.AsyncClient,
) -> None:  # fmt: skip
    wf = standin.add_workflow("Nightly")
    iid = await connect(api, editor, standin)
    instance = await session.get(N8nInstance, uuid.UUID(iid))
    assert instance is not None
    assert await snapshot_ops.nightly_instance(session, local, instance) == 1
    assert await snapshot_ops.nightly_instance(session, local, instance) == 0
    standin.workflows[wf["id"]]["nodes"][0]["position"] = [5, 5]  # not a change
    assert await snapshot_ops.nightly_instance(session, local, instance) == 0
    edited(standin, wf["id"], value="x")
    assert await snapshot_ops.nightly_instance(session, local, instance) == 1
    rows = (await session.scalars(select(N8nSnapshot).where(
        N8nSnapshot.instance_id == instance.id))).all()  # fmt: skip
    assert [r.reason for r in rows] == ["nightly", "nightly"]


# Hostile input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"stage": "Prod!"}, "stage"),
        ({"stage": ""}, "stage"),
        ({"stage": "x" * 51}, "stage"),
        ({"drift_policy": "delete"}, "drift_policy"),
        ({"approvals": {"min_approvals": -1}}, "approvals.min_approvals"),
        ({"approvals": {"min_approvals": 11}}, "approvals.min_approvals"),
        ({"approvals": {"approver_ids": ["not-a-uuid"]}}, "approvals.approver_ids"),
        ({"approvals": {"approver_min_role": "god"}}, "approvals.approver_min_role"),
        ({"allowed_hours": {"timezone": "Mars/Olympus", "start": "09:00", "end": "17:00"}},
         "allowed_hours.timezone"),
        ({"allowed_hours": {"timezone": "../../etc/passwd", "start": "09:00", "end": "17:00"}},
         "allowed_hours.timezone"),
        ({"allowed_hours": {"timezone": "UTC", "start": "25:00", "end": "17:00"}},
         "allowed_hours.start"),
        ({"allowed_hours": {"timezone": "UTC", "start": "09:00", "end": "09:00"}},
         "allowed_hours"),
        ({"allowed_hours": {"timezone": "UTC", "start": "09:00", "end": "10:00", "days": [7]}},
         "allowed_hours.days"),
        ({"protected": "yes please"}, "protected"),
        ({"instance_id": "1; drop table"}, "instance_id"),
        ({"surprise": 1}, "surprise"),
    ],
)  # fmt: skip
async def test_bad_environment_input_names_the_field(
    api: httpx.AsyncClient, standin: StandIn, session: AsyncSession, settings: Settings,
    team: Workspace, body: dict[str, Any], field: str,
) -> None:  # fmt: skip
    admin = await admin_of(session, settings, team)
    iid = await connect(api, admin, standin)
    r = await api.post(f"{N8N}/environments", headers=admin.headers,
                       json={"instance_id": iid, "stage": "dev", **body})  # fmt: skip
    assert r.status_code == 422, r.text
    assert field_of(r).startswith(field), r.text


async def test_approvers_must_be_members_and_pipelines_reject_bad_lists(
    api: httpx.AsyncClient, standin: StandIn, session: AsyncSession, settings: Settings,
    team: Workspace,
) -> None:  # fmt: skip
    admin = await admin_of(session, settings, team)
    iid = await connect(api, admin, standin)
    stranger = uuid.uuid4()
    r = await api.post(
        f"{N8N}/environments",
        headers=admin.headers,
        json={
            "instance_id": iid,
            "stage": "dev",
            "approvals": {"approver_ids": [str(admin.user.id), str(stranger)]},
        },
    )
    assert r.status_code == 422 and r.json()["field"] == "approvals.approver_ids[1]"
    env = await make_env(api, admin, iid, "dev")
    for body, field in [
        ({"name": "p", "environment_ids": []}, "environment_ids"),
        ({"name": "p", "environment_ids": [env["id"], env["id"]]}, "environment_ids[1]"),
        ({"name": "p", "environment_ids": [str(uuid.uuid4())]}, "environment_ids[0]"),
        ({"name": "", "environment_ids": [env["id"]]}, "name"),
        ({"name": "a\x00b", "environment_ids": [env["id"]]}, "name"),
        ({"name": "p", "environment_ids": [env["id"]], "description": "x" * 2001}, "description"),
    ]:
        r = await api.post(f"{N8N}/pipelines", headers=admin.headers, json=body)
        assert r.status_code in (404, 422), (body, r.text)
        assert field_of(r).startswith(field), (body, r.text)
    # Nothing was stored by the refused writes.
    r = await api.get(f"{N8N}/pipelines", headers=admin.headers)
    assert r.json()["total"] == 0
    r = await api.patch(f"{N8N}/environments/{env['id']}", headers=admin.headers,
                        json={"stage": None})  # fmt: skip
    assert r.status_code == 422 and field_of(r) == "stage"


async def test_other_workspaces_ids_are_404(
    api: httpx.AsyncClient, editor: Actor, standin: StandIn, session: AsyncSession,
    settings: Settings, team: Workspace,
) -> None:  # fmt: skip
    admin = await admin_of(session, settings, team)
    wf = standin.add_workflow("Mine")
    iid = await connect(api, admin, standin)
    env = await make_env(api, admin, iid, "dev")
    r = await api.post(f"{N8N}/pipelines", headers=admin.headers,
                       json={"name": "p", "environment_ids": [env["id"]]})  # fmt: skip
    pid = r.json()["id"]
    r = await api.post(f"{N8N}/instances/{iid}/workflows/{wf['id']}/snapshots",
                       headers=admin.headers)  # fmt: skip
    sid = r.json()["id"]
    other = await make_workspace(session, "Other")
    outsider = await member(session, settings, other, Role.OWNER)
    outsider.headers["X-Workspace-ID"] = str(other.id)
    for method, path in [
        ("GET", f"/environments/{env['id']}"), ("PATCH", f"/environments/{env['id']}"),
        ("DELETE", f"/environments/{env['id']}"), ("GET", f"/environments/{env['id']}/export"),
        ("POST", f"/environments/{env['id']}/drift-check"),
        ("GET", f"/environments/{env['id']}/drift-report"),
        ("GET", f"/pipelines/{pid}"), ("PATCH", f"/pipelines/{pid}"),
        ("DELETE", f"/pipelines/{pid}"),
        ("GET", f"/snapshots/{sid}"), ("POST", f"/snapshots/{sid}/restore"),
        ("GET", f"/snapshots/{sid}/diff/{sid}"),
        ("GET", f"/instances/{iid}/workflows/{wf['id']}/snapshots"),
        ("POST", f"/instances/{iid}/workflows/{wf['id']}/snapshots"),
        ("GET", f"/drift/incidents/{uuid.uuid4()}"),
        ("POST", f"/drift/incidents/{uuid.uuid4()}/accept"),
    ]:  # fmt: skip
        r = await api.request(method, N8N + path, headers=outsider.headers, json={})
        assert r.status_code == 404, (method, path, r.text)
    # Their instance cannot become our environment, nor our environment their pipeline.
    r = await api.post(f"{N8N}/environments", headers=outsider.headers,
                       json={"instance_id": iid, "stage": "dev"})  # fmt: skip
    assert r.status_code == 404 and r.json()["field"] == "instance_id"
    r = await api.post(f"{N8N}/pipelines", headers=outsider.headers,
                       json={"name": "p", "environment_ids": [env["id"]]})  # fmt: skip
    assert r.status_code == 404 and r.json()["field"] == "environment_ids[0]"
    # Their snapshot is not ours to diff against.
    theirs = await connect(api, outsider, standin)
    r = await api.post(f"{N8N}/instances/{theirs}/workflows/{wf['id']}/snapshots",
                       headers=outsider.headers)  # fmt: skip
    r = await api.get(f"{N8N}/snapshots/{sid}/diff/{r.json()['id']}", headers=admin.headers)
    assert r.status_code == 404 and r.json()["field"] == "other_id"
    # Lists are the caller's own.
    r = await api.get(f"{N8N}/environments", headers=outsider.headers)
    assert r.json() == []
    # Bad path values are 422 naming them.
    r = await api.get(f"{N8N}/snapshots/not-a-uuid", headers=admin.headers)
    assert r.status_code == 422 and "snapshot_id" in r.text
    r = await api.get(
        f"{N8N}/instances/{iid}/workflows/..%2F..%2Fetc/snapshots", headers=admin.headers
    )
    assert r.status_code in (404, 422)
