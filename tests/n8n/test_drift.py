"""Drift against the loopback stand-in: the first check adopts baselines; a hand edit,
an added and a deleted workflow become incidents with the right diff, deduplicated (one
unresolved per workflow, updated when it drifts further, resolved when it comes back),
people told (kind n8n_drift); acknowledge / accept / revert; the accept and restore
policies; set_baseline as promotions call it; the report; and the beat task's pass."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.permissions import Role
from backend.config import Settings
from backend.kit.db import UnitOfWork
from backend.models import (
    N8nDriftIncident,
    N8nEnvironment,
    N8nSnapshot,
    UserNotification,
    Workspace,
)
from backend.n8n import drift, snapshots
from tests.n8n.standin import StandIn
from tests.n8n.test_envs_snapshots import N8N, admin_of, connect, edited, field_of, make_env
from tests.support.factories import make_n8n_instance
from tests.support.identity import Actor, make_workspace


async def check(api: httpx.AsyncClient, actor: Actor, env: dict[str, Any]) -> dict[str, Any]:
    r = await api.post(f"{N8N}/environments/{env['id']}/drift-check", headers=actor.headers)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


async def incidents(api: httpx.AsyncClient, actor: Actor, **params: Any) -> list[dict[str, Any]]:
    r = await api.get(f"{N8N}/drift/incidents", headers=actor.headers, params=params)
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


async def setup(
    api: httpx.AsyncClient, session: AsyncSession, settings: Settings, team: Workspace,
    standin: StandIn, policy: str = "notify",
) -> tuple[Actor, dict[str, Any], list[dict[str, Any]]]:  # fmt: skip
    admin = await admin_of(session, settings, team)
    workflows = [
        standin.add_workflow("Orders", active=True, nodes=3),
        standin.add_workflow("Bills"),
    ]
    iid = await connect(api, admin, standin)
    env = await make_env(api, admin, iid, "production", drift_policy=policy)
    first = await check(api, admin, env)
    assert first["ok"] is True and first["adopted"] == 2 and first["opened"] == 0
    return admin, env, workflows


async def test_hand_edits_become_incidents_with_the_diff_and_people_hear(
    api: httpx.AsyncClient, standin: StandIn, session: AsyncSession, settings: Settings,
    team: Workspace, editor: Actor,
) -> None:  # fmt: skip
    admin, env, (orders, bills) = await setup(api, session, settings, team, standin)
    assert (await check(api, admin, env))["in_sync"] == 2
    edited(standin, orders["id"], url="https://evil.example")
    added = standin.add_workflow("Sneaky")
    del standin.workflows[bills["id"]]
    out = await check(api, admin, env)
    assert (out["opened"], out["in_sync"]) == (3, 0), out
    rows = {i["kind"]: i for i in await incidents(api, editor, environment_id=env["id"])}
    assert set(rows) == {"changed", "added", "deleted"}
    changed = rows["changed"]
    assert changed["n8n_workflow_id"] == orders["id"] and changed["status"] == "open"
    assert changed["diff"] == [{"kind": "node_changed", "node": "Step 1",
                                "type": "n8n-nodes-base.set",
                                "changes": [{"path": "parameters.url", "change": "added",
                                             "after": "https://evil.example"}]}]  # fmt: skip
    assert rows["added"]["n8n_workflow_id"] == added["id"] and rows["added"]["name"] == "Sneaky"
    assert {d["kind"] for d in rows["added"]["diff"]} == {"node_added", "settings_changed"}
    assert rows["deleted"]["diff"] == [{"kind": "workflow_deleted", "name": "Bills"}]
    # Administrators hear of it (kind n8n_drift), with what changed.
    notes = (
        await session.scalars(
            select(UserNotification).where(
                UserNotification.user_id == admin.user.id, UserNotification.kind == "n8n_drift"
            )
        )
    ).all()
    assert len(notes) == 3
    mine = next(n for n in notes if "Orders" in n.title)
    assert "was changed" in mine.title and "parameters.url" in mine.body
    # The same drift again: no new incident, no new snapshot, nobody told again.
    count = await session.scalar(
        select(N8nSnapshot.id).where(N8nSnapshot.reason == "drift").limit(1)
    )
    assert count is not None
    before = len((await session.scalars(select(N8nSnapshot))).all())
    out = await check(api, admin, env)
    assert (out["opened"], out["updated"]) == (0, 0)
    assert len((await session.scalars(select(N8nSnapshot))).all()) == before
    # Drifting further updates the one incident (reopened, counted, told again).
    r = await api.post(f"{N8N}/drift/incidents/{changed['id']}/acknowledge", headers=editor.headers)
    assert r.status_code == 200 and r.json()["status"] == "acknowledged"
    assert r.json()["acknowledged_by"] == str(editor.user.id)
    edited(standin, orders["id"], method="DELETE")
    out = await check(api, admin, env)
    assert out["updated"] == 1 and out["opened"] == 0
    r = await api.get(f"{N8N}/drift/incidents/{changed['id']}", headers=editor.headers)
    again = r.json()
    assert again["status"] == "open" and again["detections"] == 2
    assert [c["path"] for c in again["diff"][0]["changes"]] == [
        "parameters.method",
        "parameters.url",
    ]
    open_ones = await incidents(api, editor, unresolved="true")
    assert len(open_ones) == 3
    # Report: per workflow.
    r = await api.get(f"{N8N}/environments/{env['id']}/drift-report", headers=editor.headers)
    report = r.json()
    assert report["open_incidents"] == 3
    assert report["by_kind"] == {"changed": 1, "added": 1, "deleted": 1}
    states = {w["n8n_workflow_id"]: w["state"] for w in report["workflows"]}
    assert states[orders["id"]] == "drifted" and states[added["id"]] == "drifted"
    assert report["environment"]["open_incidents"] == 3


async def test_revert_accept_and_back_to_baseline(
    api: httpx.AsyncClient, standin: StandIn, session: AsyncSession, settings: Settings,
    team: Workspace, editor: Actor,
) -> None:  # fmt: skip
    admin, env, (orders, bills) = await setup(api, session, settings, team, standin)
    edited(standin, orders["id"], url="https://evil.example")
    edited(standin, bills["id"], value="ok")
    added = standin.add_workflow("Sneaky")
    await check(api, admin, env)
    rows = {i["n8n_workflow_id"]: i for i in await incidents(api, editor)}
    # Revert: baseline written back, published again (it was), the incident closed.
    standin.calls.clear()
    r = await api.post(f"{N8N}/drift/incidents/{rows[orders['id']]['id']}/revert",
                       headers=editor.headers, json={"note": "not via a promotion"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "reverted" and r.json()["resolved_by"] == str(editor.user.id)
    assert "url" not in standin.workflows[orders["id"]]["nodes"][1]["parameters"]
    assert standin.workflows[orders["id"]]["active"] is True
    assert any(c.path.endswith(f"{orders['id']}/publish") for c in standin.calls)
    reasons = [
        s.reason
        for s in (
            await session.scalars(
                select(N8nSnapshot)
                .where(N8nSnapshot.n8n_workflow_id == orders["id"])
                .order_by(N8nSnapshot.created_at)
            )
        ).all()
    ]
    assert reasons == ["baseline", "drift", "pre-restore", "restore"]
    # A second revert is refused: it is closed.
    r = await api.post(f"{N8N}/drift/incidents/{rows[orders['id']]['id']}/revert",
                       headers=editor.headers)  # fmt: skip
    assert r.status_code == 409 and r.json()["error"] == "invalid_transition"
    # Accept: the edit becomes the baseline; the next check finds it in sync.
    r = await api.post(f"{N8N}/drift/incidents/{rows[bills['id']]['id']}/accept",
                       headers=editor.headers)  # fmt: skip
    assert r.status_code == 200 and r.json()["status"] == "accepted"
    # Revert of an added workflow deletes it on n8n (after a snapshot of it).
    r = await api.post(f"{N8N}/drift/incidents/{rows[added['id']]['id']}/revert",
                       headers=editor.headers)  # fmt: skip
    assert r.status_code == 200 and added["id"] not in standin.workflows
    out = await check(api, admin, env)
    assert out["in_sync"] == 2 and out["opened"] == 0, out
    # A workflow edited and then put back by hand resolves its incident by itself.
    edited(standin, orders["id"], url="https://again.example")
    await check(api, admin, env)
    node = standin.workflows[orders["id"]]["nodes"][1]
    node["parameters"] = {k: v for k, v in node["parameters"].items() if k != "url"}
    out = await check(api, admin, env)
    assert out["resolved"] == 1
    last = (await incidents(api, editor, status="resolved"))[0]
    assert last["resolution"] == "back at its baseline"
    assert await incidents(api, editor, unresolved="true") == []


async def test_deleted_workflow_reverted_is_created_again(
    api: httpx.AsyncClient, standin: StandIn, session: AsyncSession, settings: Settings,
    team: Workspace, editor: Actor,
) -> None:  # fmt: skip
    admin, env, (orders, _) = await setup(api, session, settings, team, standin)
    del standin.workflows[orders["id"]]
    await check(api, admin, env)
    (row,) = await incidents(api, editor)
    r = await api.post(f"{N8N}/drift/incidents/{row['id']}/revert", headers=editor.headers)
    assert r.status_code == 200, r.text
    assert r.json()["resolution"].startswith("reverted as ")
    again = next(w for w in standin.workflows.values() if w["name"] == "Orders")
    assert again["active"] is True and len(again["nodes"]) == 3
    out = await check(api, admin, env)
    assert out["in_sync"] == 2 and out["opened"] == 0


async def test_accept_and_restore_policies(
    api: httpx.AsyncClient, standin: StandIn, session: AsyncSession, settings: Settings,
    team: Workspace,
) -> None:  # fmt: skip
    admin, env, (orders, bills) = await setup(api, session, settings, team, standin, "accept")
    edited(standin, orders["id"], url="https://new.example")
    out = await check(api, admin, env)
    assert out["accepted"] == 1
    (row,) = await incidents(api, admin)
    assert row["status"] == "accepted" and row["resolution"] == "policy:accept"
    assert (await check(api, admin, env))["in_sync"] == 2
    # Restore policy: put back at once, the incident recorded as reverted.
    r = await api.patch(f"{N8N}/environments/{env['id']}", headers=admin.headers,
                        json={"drift_policy": "restore"})  # fmt: skip
    assert r.status_code == 200
    edited(standin, bills["id"], url="https://evil.example")
    out = await check(api, admin, env)
    assert out["reverted"] == 1
    assert "url" not in standin.workflows[bills["id"]]["nodes"][1]["parameters"]
    row = (await incidents(api, admin, status="reverted"))[0]
    assert row["resolution"] == "policy:restore"
    notes = (
        await session.scalars(
            select(UserNotification).where(
                UserNotification.user_id == admin.user.id, UserNotification.kind == "n8n_drift"
            )
        )
    ).all()
    assert any("reverted by policy" in n.title for n in notes)
    assert (await check(api, admin, env))["in_sync"] == 2


async def test_set_baseline_is_what_promotions_move(
    api: httpx.AsyncClient, standin: StandIn, session: AsyncSession, settings: Settings,
    team: Workspace, local: Settings,
) -> None:  # fmt: skip
    admin, env, (orders, _) = await setup(api, session, settings, team, standin)
    # A change arriving "by promotion": snapshot taken, baseline moved, no incident.
    edited(standin, orders["id"], url="https://promoted.example")
    snap = await snapshots.take(
        session, workspace_id=team.id, instance_id=uuid.UUID(env["instance_id"]),
        n8n_workflow_id=orders["id"], reason="promotion", by_user_id=admin.user.id,
        settings=local,
    )  # fmt: skip
    await snapshots.set_baseline(session, instance_id=snap.instance_id,
                                 n8n_workflow_id=orders["id"], snapshot_id=snap.id)  # fmt: skip
    await snapshots.set_baseline(session, instance_id=snap.instance_id,
                                 n8n_workflow_id=orders["id"], snapshot_id=snap.id)  # fmt: skip
    out = await check(api, admin, env)
    assert out["in_sync"] == 2 and out["opened"] == 0
    base = await snapshots.baseline_of(session, snap.instance_id, orders["id"])
    assert base is not None and base.id == snap.id


async def test_incident_routes_refuse_bad_input_and_outsiders(
    api: httpx.AsyncClient, standin: StandIn, session: AsyncSession, settings: Settings,
    team: Workspace, editor: Actor,
) -> None:  # fmt: skip
    admin, env, (orders, _) = await setup(api, session, settings, team, standin)
    edited(standin, orders["id"], url="x")
    await check(api, admin, env)
    (row,) = await incidents(api, editor)
    bad: list[tuple[dict[str, str | int], str]] = [
        ({"status": "exploded"}, "status"),
        ({"environment_id": "nope"}, "environment_id"),
        ({"limit": 0}, "limit"),
    ]
    for params, field in bad:
        r = await api.get(f"{N8N}/drift/incidents", headers=editor.headers, params=params)
        assert r.status_code == 422 and field_of(r).endswith(field), r.text
    r = await api.post(f"{N8N}/drift/incidents/{row['id']}/acknowledge", headers=editor.headers,
                       json={"note": "x" * 2001})  # fmt: skip
    assert r.status_code == 422 and field_of(r) == "note"
    r = await api.post(f"{N8N}/drift/incidents/{row['id']}/acknowledge", headers=editor.headers,
                       json={"note": "ok", "extra": True})  # fmt: skip
    assert r.status_code == 422 and field_of(r) == "extra"
    viewer = await admin_of(session, settings, team)
    from tests.support.identity import member

    viewer = await member(session, settings, team, Role.VIEWER)
    viewer.headers["X-Workspace-ID"] = str(team.id)
    r = await api.post(f"{N8N}/drift/incidents/{row['id']}/revert", headers=viewer.headers)
    assert r.status_code == 403
    # A protected environment: reverts take an administrator.
    await api.patch(f"{N8N}/environments/{env['id']}", headers=admin.headers,
                    json={"protected": True})  # fmt: skip
    r = await api.post(f"{N8N}/drift/incidents/{row['id']}/revert", headers=editor.headers)
    assert r.status_code == 403 and r.json()["error"] == "permission_denied"
    r = await api.post(f"{N8N}/drift/incidents/{row['id']}/revert", headers=admin.headers)
    assert r.status_code == 200 and r.json()["status"] == "reverted"
    stored = await session.get(N8nDriftIncident, uuid.UUID(row["id"]))
    assert stored is not None and stored.status == "reverted"


async def test_an_unreachable_instance_changes_nothing(
    api: httpx.AsyncClient, standin: StandIn, session: AsyncSession, settings: Settings,
    team: Workspace,
) -> None:  # fmt: skip
    admin, env, _ = await setup(api, session, settings, team, standin)
    standin.faults += [503, 503, 503]
    out = await check(api, admin, env)
    assert out["ok"] is False and "503" in (out["reason"] or "")
    assert await incidents(api, admin) == []


async def test_switched_off_by_hand_is_drift_and_a_toggle_through_us_is_not(
    api: httpx.AsyncClient, standin: StandIn, session: AsyncSession, settings: Settings,
    team: Workspace, editor: Actor,
) -> None:  # fmt: skip
    admin, env, (orders, bills) = await setup(api, session, settings, team, standin)
    # Off by hand in n8n (same definition): drift, and a revert switches it on again.
    standin.workflows[orders["id"]]["active"] = False
    out = await check(api, admin, env)
    assert out["opened"] == 1, out
    (row,) = await incidents(api, editor)
    assert row["diff"] == [{"kind": "active_changed", "before": True, "after": False}]
    r = await api.post(f"{N8N}/drift/incidents/{row['id']}/revert", headers=editor.headers)
    assert r.status_code == 200, r.text
    assert standin.workflows[orders["id"]]["active"] is True
    # On by hand, then off again by hand: one incident, updated, closed by itself.
    standin.workflows[bills["id"]]["active"] = True
    assert (await check(api, admin, env))["opened"] == 1
    standin.workflows[bills["id"]]["active"] = False
    out = await check(api, admin, env)
    assert out["resolved"] == 1 and out["opened"] == 0
    # A toggle through our API moves the baseline: no drift.
    await api.post(f"{N8N}/instances/{env['instance_id']}/refresh", headers=admin.headers)
    r = await api.post(f"{N8N}/instances/{env['instance_id']}/workflows/{bills['id']}/toggle",
                       headers=admin.headers, json={"active": True})  # fmt: skip
    assert r.status_code == 200, r.text
    out = await check(api, admin, env)
    assert out["opened"] == 0 and out["in_sync"] == 2, out


async def test_two_checks_at_once_open_one_incident(
    standin: StandIn, maker: async_sessionmaker[AsyncSession], local: Settings
) -> None:
    """Beat's check and a person's check-now of one environment, at the same moment, in
    their own transactions: the environment's row lock keeps the incident single."""
    wf = standin.add_workflow("Race", nodes=2)
    async with UnitOfWork(maker) as uow:
        workspace = await make_workspace(uow.session, "race")
        instance = await make_n8n_instance(uow.session, workspace, base_url=standin.base,
                                           api_key=standin.api_key)  # fmt: skip
        env = N8nEnvironment(workspace_id=workspace.id, instance_id=instance.id, stage="prod",
                             approvals={}, allowed_hours={})  # fmt: skip
        uow.session.add(env)
    env_id = env.id

    async def one() -> drift.Outcome:
        async with UnitOfWork(maker) as uow:
            row = await uow.session.get(N8nEnvironment, env_id)
            assert row is not None
            return await drift.check_environment(uow, local, row)

    try:
        assert (await one()).adopted == 1
        edited(standin, wf["id"], url="https://race.example")
        outcomes = await asyncio.gather(one(), one())
        assert sorted(o.opened for o in outcomes) == [0, 1], outcomes
        async with maker() as session:
            rows = (await session.scalars(select(N8nDriftIncident).where(
                N8nDriftIncident.environment_id == env_id))).all()  # fmt: skip
        assert len(rows) == 1 and rows[0].detections == 1
    finally:
        # Committed rows: gone again, so no other test's beat pass meets this instance.
        async with UnitOfWork(maker) as uow:
            await uow.session.delete(await uow.session.get(Workspace, workspace.id))
