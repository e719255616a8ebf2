"""Against two real n8n 2.41.1 instances (make test-n8n): both become environments of one
pipeline; a hand edit in the target (through n8n's own API, as a person in its editor
would save it) is found as drift with the right diff and reverted; a restore brings back
an earlier snapshot, still published."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from backend.config import Settings
from backend.models import Workspace
from backend.n8n import client as n8n
from backend.n8n import snapshots
from backend.n8n.api_types import Node, WorkflowCreate
from tests.n8n.conftest import n8n_settings
from tests.n8n.real.server import RealN8n
from tests.n8n.test_envs_snapshots import N8N, admin_of, make_env

URL = f"{N8N}/instances"


def webhook_workflow(name: str, path: str) -> WorkflowCreate:
    return {
        "name": name,
        "nodes": [
            {"id": str(uuid.uuid4()), "name": "Webhook", "type": "n8n-nodes-base.webhook",
             "typeVersion": 2, "position": [0, 0], "webhookId": str(uuid.uuid4()),
             "parameters": {"path": path, "httpMethod": "POST", "responseMode": "onReceived"}},
            {"id": str(uuid.uuid4()), "name": "Shape", "type": "n8n-nodes-base.set",
             "typeVersion": 3.4, "position": [220, 0],
             "parameters": {"mode": "raw", "jsonOutput": '{"tier": "gold"}', "options": {}}},
        ],
        "connections": {"Webhook": {"main": [[{"node": "Shape", "type": "main", "index": 0}]]}},
        "settings": {"executionOrder": "v1"},
    }  # fmt: skip


def hand_edit(workflow: dict[str, Any], json_output: str) -> WorkflowCreate:
    """What a person's save in n8n's editor sends: the same nodes, one parameter changed
    and the node moved."""
    nodes: list[Node] = []
    for given in workflow["nodes"]:
        node: Any = {k: v for k, v in given.items() if k in snapshots.NODE_KEYS}
        if node["name"] == "Shape":
            node["parameters"] = {**node["parameters"], "jsonOutput": json_output}
            node["position"] = [480, 120]
        nodes.append(node)
    return {"name": workflow["name"], "nodes": nodes, "connections": workflow["connections"],
            "settings": {"executionOrder": "v1"}}  # fmt: skip


async def connect(api: httpx.AsyncClient, headers: dict[str, str], real: RealN8n, name: str) -> str:
    r = await api.post(
        URL, headers=headers, json={"name": name, "base_url": real.base, "api_key": real.api_key}
    )
    assert r.status_code == 201, r.text
    iid = str(r.json()["id"])
    r = await api.post(f"{URL}/{iid}/test", headers=headers)
    assert r.json()["ok"] is True, r.text
    return iid


async def test_drift_in_the_target_is_found_and_reverted_and_a_restore_brings_back_a_snapshot(
    n8n_pair: tuple[RealN8n, RealN8n], api: httpx.AsyncClient, session: AsyncSession,
    settings: Settings, team: Workspace,
) -> None:  # fmt: skip
    source, target = n8n_pair
    assert source.base != target.base
    local = n8n_settings(settings)
    admin = await admin_of(session, settings, team)
    h = admin.headers
    tag = uuid.uuid4().hex[:6]
    async with n8n.client_for(local, target.base, target.api_key) as direct:
        made = await direct.create_workflow(webhook_workflow(f"Orders {tag}", f"orders-{tag}"))
        await direct.publish(made["id"])
    wid = str(made["id"])
    src_i = await connect(api, h, source, f"staging-{tag}")
    dst_i = await connect(api, h, target, f"production-{tag}")
    staging = await make_env(api, admin, src_i, "staging")
    production = await make_env(api, admin, dst_i, "production", protected=True)
    r = await api.post(f"{N8N}/pipelines", headers=h,
                       json={"name": f"main-{tag}",
                             "environment_ids": [staging["id"], production["id"]]})  # fmt: skip
    assert [s["stage"] for s in r.json()["stages"]] == ["staging", "production"]
    # First check: what is on production is the baseline.
    r = await api.post(f"{N8N}/environments/{production['id']}/drift-check", headers=h)
    assert r.json()["ok"] is True and r.json()["adopted"] >= 1, r.text
    r = await api.post(f"{N8N}/environments/{production['id']}/drift-check", headers=h)
    assert r.json()["opened"] == 0 and r.json()["in_sync"] >= 1, r.text
    # A hand edit in production.
    async with n8n.client_for(local, target.base, target.api_key) as direct:
        current = dict(await direct.workflow(wid))
        await direct.update_workflow(wid, hand_edit(current, '{"tier": "platinum"}'))
    r = await api.post(f"{N8N}/environments/{production['id']}/drift-check", headers=h)
    assert r.json()["opened"] == 1, r.text
    r = await api.get(
        f"{N8N}/drift/incidents",
        headers=h,
        params={"environment_id": production["id"], "unresolved": "true"},
    )
    [incident] = r.json()["items"]
    assert incident["kind"] == "changed" and incident["n8n_workflow_id"] == wid
    # The right diff: one parameter of one node (its move is not a change).
    assert incident["diff"] == [
        {
            "kind": "node_changed",
            "node": "Shape",
            "type": "n8n-nodes-base.set",
            "changes": [
                {
                    "path": "parameters.jsonOutput",
                    "change": "changed",
                    "before": '{"tier": "gold"}',
                    "after": '{"tier": "platinum"}',
                }
            ],
        }
    ], incident
    # Reverted: n8n holds the baseline again, still published; the next check is clean.
    r = await api.post(f"{N8N}/drift/incidents/{incident['id']}/revert", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "reverted", r.text
    async with n8n.client_for(local, target.base, target.api_key) as direct:
        back: dict[str, Any] = dict(await direct.workflow(wid))
    shape = next(n for n in back["nodes"] if n["name"] == "Shape")
    assert shape["parameters"]["jsonOutput"] == '{"tier": "gold"}'
    assert back["active"] is True
    r = await api.post(f"{N8N}/environments/{production['id']}/drift-check", headers=h)
    assert r.json()["opened"] == 0 and r.json()["updated"] == 0, r.text
    # Restore on the source: snapshot, edit, snapshot, restore the first.
    async with n8n.client_for(local, source.base, source.api_key) as direct:
        mine = await direct.create_workflow(webhook_workflow(f"Leads {tag}", f"leads-{tag}"))
        await direct.publish(mine["id"])
    sid_url = f"{URL}/{src_i}/workflows/{mine['id']}/snapshots"
    r = await api.post(sid_url, headers=h, json={"note": "known good"})
    assert r.status_code == 201, r.text
    good = r.json()
    async with n8n.client_for(local, source.base, source.api_key) as direct:
        current = dict(await direct.workflow(mine["id"]))
        await direct.update_workflow(mine["id"], hand_edit(current, '{"tier": "lead"}'))
    r = await api.post(sid_url, headers=h)
    bad = r.json()
    assert bad["digest"] != good["digest"]
    r = await api.get(f"{N8N}/snapshots/{good['id']}/diff/{bad['id']}", headers=h)
    assert [c["path"] for c in r.json()["changes"][0]["changes"]] == ["parameters.jsonOutput"]
    r = await api.post(f"{N8N}/snapshots/{good['id']}/restore", headers=h)
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["before"]["digest"] == bad["digest"] and done["after"]["digest"] == good["digest"]
    assert done["active"] is True
    async with n8n.client_for(local, source.base, source.api_key) as direct:
        restored = dict(await direct.workflow(mine["id"]))
    assert snapshots.digest(snapshots.normalise(restored)) == good["digest"]
    assert restored["active"] is True
    # Export of the production environment: the reverted workflow, as n8n has it.
    r = await api.get(f"{N8N}/environments/{production['id']}/export", headers=h)
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert target.api_key not in r.text
