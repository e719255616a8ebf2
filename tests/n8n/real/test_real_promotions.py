"""Against two real n8n 2.41.1 instances (make test-n8n): a workflow promoted from a dev
n8n to a production n8n with an approval, its credential mapped by name and type
(created on both through n8n's public API, `POST /credentials`), published, read back;
then an update found by lineage, deployed over the first."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.permissions import Role
from backend.config import Settings
from backend.models import N8nEnvironment, N8nPipeline, Workspace
from backend.n8n import promotions
from tests.n8n import spec
from tests.n8n.real.server import RealN8n
from tests.support.identity import Actor, member

URL = "/api/v1/n8n/promotions"
INSTANCES = "/api/v1/n8n/instances"


async def credential(n8n: RealN8n, name: str) -> dict[str, Any]:
    body = {"name": name, "type": "httpHeaderAuth",
            "data": {"name": "X-Token", "value": f"secret-{uuid.uuid4().hex[:6]}"}}  # fmt: skip
    async with httpx.AsyncClient(base_url=n8n.base + "/api/v1", timeout=30,
                                 headers={"X-N8N-API-KEY": n8n.api_key}) as raw:  # fmt: skip
        r = await raw.post("/credentials", json=body)
        assert r.status_code == 200, r.text
        assert spec.check_answer("/credentials", "post", 200, r.json()) == []
        listed = await raw.get("/credentials")
        assert spec.check_answer("/credentials", "get", 200, listed.json()) == []
        made: dict[str, Any] = r.json()
        return made


def calling_workflow(path: str, cred: dict[str, Any], url: str) -> dict[str, Any]:
    return {
        "name": f"Promote me {path}",
        "nodes": [
            {"id": str(uuid.uuid4()), "name": "Webhook", "type": "n8n-nodes-base.webhook",
             "typeVersion": 2, "position": [0, 0], "webhookId": str(uuid.uuid4()),
             "parameters": {"path": path, "httpMethod": "POST", "responseMode": "onReceived"}},
            {"id": str(uuid.uuid4()), "name": "Call API", "type": "n8n-nodes-base.httpRequest",
             "typeVersion": 4.2, "position": [220, 0],
             "parameters": {"url": url, "authentication": "genericCredentialType",
                            "genericAuthType": "httpHeaderAuth", "options": {}},
             "credentials": {"httpHeaderAuth": {"id": cred["id"], "name": cred["name"]}}},
        ],
        "connections": {"Webhook": {"main": [[{"node": "Call API", "type": "main", "index": 0}]]}},
        "settings": {"executionOrder": "v1"},
    }  # fmt: skip


async def test_promotion_between_two_real_instances_with_a_mapped_credential_and_an_approval(
    n8n_pair: tuple[RealN8n, RealN8n], api: httpx.AsyncClient, session: AsyncSession,
    settings: Settings, team: Workspace, editor: Actor,
) -> None:  # fmt: skip
    dev, prod = n8n_pair
    name = f"Orders API {uuid.uuid4().hex[:6]}"
    dev_cred = await credential(dev, name)
    prod_cred = await credential(prod, name)
    assert dev_cred["id"] != prod_cred["id"] or dev.base != prod.base
    path = f"promote-{uuid.uuid4().hex[:8]}"
    headers = {"X-N8N-API-KEY": dev.api_key}
    async with httpx.AsyncClient(base_url=dev.base + "/api/v1", headers=headers,
                                 timeout=30) as raw:  # fmt: skip
        r = await raw.post("/workflows", json=calling_workflow(path, dev_cred,
                                                               "http://127.0.0.1:9/a"))  # fmt: skip
        assert r.status_code == 200, r.text
        source = r.json()
        r = await raw.post(f"/workflows/{source['id']}/publish")
        assert r.status_code == 200, r.text

    approver = await member(session, settings, team, Role.ADMINISTRATOR)
    approver.headers["X-Workspace-ID"] = str(team.id)
    ids = []
    for label, n8n in (("dev", dev), ("prod", prod)):
        connect = {"name": label, "base_url": n8n.base, "api_key": n8n.api_key}
        r = await api.post(INSTANCES, headers=editor.headers, json=connect)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    dev_env = N8nEnvironment(id=uuid.uuid4(), workspace_id=team.id, instance_id=uuid.UUID(ids[0]),
                             stage="dev")  # fmt: skip
    prod_env = N8nEnvironment(
        id=uuid.uuid4(), workspace_id=team.id, instance_id=uuid.UUID(ids[1]), stage="production",
        protected=True, approvals={"min_approvals": 1, "approver_ids": [str(approver.user.id)]},
    )  # fmt: skip
    session.add_all([dev_env, prod_env])
    await session.flush()
    session.add(N8nPipeline(id=uuid.uuid4(), workspace_id=team.id, name="main",
                            environment_ids=[str(dev_env.id), str(prod_env.id)]))  # fmt: skip
    await session.flush()
    body = {"workflow": {"instance_id": ids[0], "n8n_workflow_id": source["id"]},
            "from_env": str(dev_env.id), "to_env": str(prod_env.id),
            "min_success_rate": 0}  # fmt: skip

    r = await api.post(URL, headers=editor.headers, json=body)
    assert r.status_code == 201, r.text
    plan = r.json()
    assert (plan["action"], plan["status"]) == ("create", "awaiting_approval")
    creds = plan["plan"]["credentials"]
    assert creds["source"] == "list" and creds["missing"] == []
    [mapped] = creds["mapped"]
    assert (mapped["type"], mapped["name"], mapped["source_id"], mapped["target_id"]) == (
        "httpHeaderAuth",
        name,
        dev_cred["id"],
        prod_cred["id"],
    )
    [task_id] = plan["task_ids"]
    r = await api.post(f"/api/v1/tasks/{task_id}/approve", headers=approver.headers,
                       json={"comment": "go"})  # fmt: skip
    assert r.status_code == 200, r.text
    r = await api.post(f"{URL}/{plan['id']}/execute", headers=editor.headers)
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["status"] == "deployed", done["deployment"]
    target_id = done["target_workflow_id"]

    prod_headers = {"X-N8N-API-KEY": prod.api_key}
    async with httpx.AsyncClient(base_url=prod.base + "/api/v1", headers=prod_headers,
                                 timeout=30) as raw:  # fmt: skip
        r = await raw.get(f"/workflows/{target_id}")
        assert r.status_code == 200, r.text
        made = r.json()
    assert made["active"] is True
    call = next(n for n in made["nodes"] if n["name"] == "Call API")
    assert call["credentials"]["httpHeaderAuth"]["id"] == prod_cred["id"]
    # n8n keeps the lineage marker we wrote into the settings.
    assert promotions.marker_of(made) == plan["lineage_id"]

    # An update on dev goes over the same production workflow (found by lineage).
    async with httpx.AsyncClient(base_url=dev.base + "/api/v1", headers=headers,
                                 timeout=30) as raw:  # fmt: skip
        changed = calling_workflow(path, dev_cred, "http://127.0.0.1:9/b")
        current = (await raw.get(f"/workflows/{source['id']}")).json()
        changed["nodes"] = current["nodes"]
        next(n for n in changed["nodes"] if n["name"] == "Call API")["parameters"]["url"] = (
            "http://127.0.0.1:9/b"
        )
        r = await raw.put(f"/workflows/{source['id']}", json=changed)
        assert r.status_code == 200, r.text
    r = await api.post(URL, headers=editor.headers, json=body)
    assert r.status_code == 201, r.text
    plan = r.json()
    assert (plan["action"], plan["matched_by"], plan["target_workflow_id"]) == (
        "update",
        "lineage",
        target_id,
    )
    changes = [c for d in plan["plan"]["diff"] for c in d.get("changes", [])]
    assert {"path": "parameters.url", "change": "changed", "before": "http://127.0.0.1:9/a",
            "after": "http://127.0.0.1:9/b"} in changes, plan["plan"]["diff"]  # fmt: skip
    r = await api.post(f"{URL}/{plan['id']}/approve", headers=approver.headers, json={})
    assert r.status_code == 200 and r.json()["status"] == "approved", r.text
    r = await api.post(f"{URL}/{plan['id']}/execute", headers=editor.headers)
    assert r.status_code == 200 and r.json()["status"] == "deployed", r.text
    async with httpx.AsyncClient(base_url=prod.base + "/api/v1", headers=prod_headers,
                                 timeout=30) as raw:  # fmt: skip
        now = (await raw.get(f"/workflows/{target_id}")).json()
    call = next(n for n in now["nodes"] if n["name"] == "Call API")
    assert call["parameters"]["url"] == "http://127.0.0.1:9/b"
    assert call["credentials"]["httpHeaderAuth"]["id"] == prod_cred["id"]
    assert now["active"] is True
    r = await api.get("/api/v1/n8n/deployments", headers=editor.headers,
                      params={"environment": str(prod_env.id)})  # fmt: skip
    assert [d["status"] for d in r.json()["items"]] == ["deployed", "deployed"]
