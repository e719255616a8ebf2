"""/api/v1/n8n against the loopback stand-in: instances (key sealed, never returned,
clear errors for bad input), test, sync (incremental, removals, unreachable keeps what
was synced), workflow and execution lists, toggle (seen on the instance, logged, quota
402), retry, the error workflow installed and linked, and the intake (deduplicated,
linked, people told)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.permissions import Role
from backend.config import Settings
from backend.models import (
    ActivityLog,
    N8nError,
    N8nInstance,
    UserNotification,
    Workspace,
)
from backend.n8n.service import secrets_of
from tests.n8n.standin import StandIn
from tests.support.identity import Actor, member

URL = "/api/v1/n8n/instances"


async def connect(
    api: httpx.AsyncClient, actor: Actor, standin: StandIn, **extra: Any
) -> dict[str, Any]:
    body = {"name": f"n8n-{uuid.uuid4().hex[:6]}", "base_url": standin.base,
            "api_key": standin.api_key, **extra}  # fmt: skip
    r = await api.post(URL, headers=actor.headers, json=body)
    assert r.status_code == 201, r.text
    made: dict[str, Any] = r.json()
    return made


def field_of(r: httpx.Response) -> str:
    body = r.json()
    return str(body.get("field") or body["fields"][0]["field"])


async def refresh(api: httpx.AsyncClient, actor: Actor, iid: str) -> dict[str, Any]:
    r = await api.post(f"{URL}/{iid}/refresh", headers=actor.headers)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


async def test_the_key_is_sealed_and_never_returned(
    api: httpx.AsyncClient, editor: Actor, standin: StandIn, session: AsyncSession, local: Settings
) -> None:
    made = await connect(api, editor, standin, environment="staging", tags=["eu"])
    assert made["has_api_key"] is True and "api_key" not in made
    assert made["webhook_secret"].startswith("whsec_")
    listed = await api.get(URL, headers=editor.headers)
    one = await api.get(f"{URL}/{made['id']}", headers=editor.headers)
    for text in (str(made), listed.text, one.text):
        assert standin.api_key not in text
    assert "webhook_secret" not in one.json()
    assert one.json()["intake_url"].startswith("http://test/api/v1/hooks/n8n/n8n_")
    row = await session.get(N8nInstance, uuid.UUID(made["id"]))
    assert row is not None and standin.api_key not in row.secrets_encrypted
    assert secrets_of(local, row).api_key == standin.api_key
    # Filters.
    r = await api.get(URL, headers=editor.headers, params={"environment": "staging", "tag": "eu"})
    assert [i["id"] for i in r.json()["items"]] == [made["id"]]
    r = await api.get(URL, headers=editor.headers, params={"tag": "us"})
    assert r.json()["total"] == 0
    # A patch without api_key keeps it; one with a new key stores that one.
    r = await api.patch(f"{URL}/{made['id']}", headers=editor.headers, json={"environment": "prod"})
    assert r.status_code == 200 and r.json()["environment"] == "prod"
    await session.refresh(row)
    assert secrets_of(local, row).api_key == standin.api_key
    r = await api.patch(f"{URL}/{made['id']}", headers=editor.headers, json={"api_key": "new"})
    assert r.status_code == 200 and r.json()["status"] == "unknown"
    await session.refresh(row)
    assert secrets_of(local, row).api_key == "new"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"base_url": "ftp://n8n.example.com"}, "base_url"),
        ({"base_url": "https://user:pw@n8n.example.com"}, "base_url"),
        ({"base_url": "https://n8n.example.com?x=1"}, "base_url"),
        ({"base_url": "http://n8n.example.com:99999"}, "base_url"),
        ({"base_url": "http://n8n.example.com:0"}, "base_url"),
        ({"base_url": "https://exa mple.com"}, "base_url"),
        ({"api_key": ""}, "api_key"),
        # The README's own placeholder once went in and failed later, in the HTTP client,
        # with the key in the error (a 500, the key in logs and Flower).
        ({"api_key": "n8n_api_\u2026"}, "api_key"),
        ({"api_key": "abc\r\nX-Evil: 1"}, "api_key"),
        ({"api_key": "two words"}, "api_key"),
        ({"name": ""}, "name"),
        ({"tags": ["ok", "bad\x00tag"]}, "tags[1]"),
        ({"notify": {"webhooks": ["file:///etc/passwd"]}}, "notify.webhooks"),
        ({"unknown": 1}, "unknown"),
    ],
)
async def test_bad_input_names_the_field(
    api: httpx.AsyncClient, editor: Actor, body: dict[str, Any], field: str
) -> None:
    good = {"name": "n", "base_url": "https://n8n.example.com", "api_key": "k"}
    r = await api.post(URL, headers=editor.headers, json={**good, **body})
    assert r.status_code == 422, r.text
    assert field_of(r).startswith(field)
    if "api_key" in body:
        assert body["api_key"] == "" or body["api_key"] not in r.text


async def test_duplicate_name_is_409(
    api: httpx.AsyncClient, editor: Actor, standin: StandIn
) -> None:
    made = await connect(api, editor, standin)
    body = {"name": made["name"], "base_url": standin.base, "api_key": "k"}
    r = await api.post(URL, headers=editor.headers, json=body)
    assert r.status_code == 409 and r.json()["field"] == "name"


async def test_test_reports_version_scopes_and_a_clear_status_when_down(
    api: httpx.AsyncClient, editor: Actor, standin: StandIn
) -> None:
    made = await connect(api, editor, standin)
    r = await api.post(f"{URL}/{made['id']}/test", headers=editor.headers)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["ok"] is True and out["status"] == "ok" and out["n8n_version"] == "2.x"
    assert out["capabilities"]["execution:list"] is True
    assert out["capabilities"]["legacy_publish"] is False
    # A wrong key and an unreachable URL are the instance's state, not a 500.
    await api.patch(f"{URL}/{made['id']}", headers=editor.headers, json={"api_key": "wrong"})
    out = (await api.post(f"{URL}/{made['id']}/test", headers=editor.headers)).json()
    assert (out["ok"], out["status"]) == (False, "unauthorized")
    from tests.support.procs import free_port

    down = {"base_url": f"http://127.0.0.1:{free_port()}", "api_key": "k"}
    await api.patch(f"{URL}/{made['id']}", headers=editor.headers, json=down)
    r = await api.post(f"{URL}/{made['id']}/test", headers=editor.headers)
    assert r.status_code == 200
    assert (r.json()["ok"], r.json()["status"]) == (False, "unreachable")
    assert "cannot connect" in r.json()["reason"]
    r = await api.post(f"{URL}/{made['id']}/refresh", headers=editor.headers)
    assert r.status_code == 200 and r.json()["status"] == "unreachable"
    # A name that does not resolve is unreachable too (it was a 500).
    lost = {"base_url": "https://n8n.nothing.invalid"}
    await api.patch(f"{URL}/{made['id']}", headers=editor.headers, json=lost)
    r = await api.post(f"{URL}/{made['id']}/test", headers=editor.headers)
    assert r.status_code == 200, r.text
    assert (r.json()["ok"], r.json()["status"]) == (False, "unreachable")
    assert "does not resolve" in r.json()["reason"]


async def test_refresh_syncs_workflows_and_executions_incrementally(
    api: httpx.AsyncClient, editor: Actor, standin: StandIn
) -> None:
    a = standin.add_workflow("Orders sync", active=True, tags=["prod"], nodes=3)
    b = standin.add_workflow("Invoices", tags=["billing"])
    old = datetime.now(UTC) - timedelta(days=30)
    standin.add_execution(a["id"], "success", started=old)  # before the lookback
    ok = standin.add_execution(a["id"], "success")
    bad = standin.add_execution(b["id"], "error", error="Bad request", node="HTTP Request")
    running = standin.add_execution(a["id"], "running")
    made = await connect(api, editor, standin)
    iid = made["id"]
    out = await refresh(api, editor, iid)
    assert (out["ok"], out["workflows"], out["executions"]) == (True, 2, 3)
    r = await api.get(f"{URL}/{iid}/workflows", headers=editor.headers)
    assert [w["name"] for w in r.json()["items"]] == ["Invoices", "Orders sync"]
    orders = next(w for w in r.json()["items"] if w["name"] == "Orders sync")
    assert orders["active"] is True and orders["tags"] == ["prod"] and orders["node_count"] == 3
    for params, names in (({"active": "true"}, ["Orders sync"]), ({"tag": "billing"}, ["Invoices"]),
                          ({"q": "order"}, ["Orders sync"]), ({"q": "%"}, [])):  # fmt: skip
        r = await api.get(f"{URL}/{iid}/workflows", headers=editor.headers, params=params)
        assert [w["name"] for w in r.json()["items"]] == names, params
    detail = (await api.get(f"{URL}/{iid}/workflows/{a['id']}", headers=editor.headers)).json()
    assert len(detail["definition"]["nodes"]) == 3 and "settings" in detail["definition"]
    r = await api.get(f"{URL}/{iid}/executions", headers=editor.headers, params={"status": "error"})
    [failed] = r.json()["items"]
    assert failed["n8n_id"] == bad["id"]
    assert (failed["error_message"], failed["failed_node"]) == ("Bad request", "HTTP Request")
    r = await api.get(f"{URL}/{iid}/executions", headers=editor.headers,
                      params={"workflow_id": a["id"]})  # fmt: skip
    assert {e["n8n_id"] for e in r.json()["items"]} == {ok["id"], running["id"]}
    # Next sync: from the cursor back to the oldest unfinished execution; its end is seen,
    # a removed workflow disappears.
    standin.executions[running["id"]].update(status="success", finished=True,
                                             stoppedAt=running["startedAt"])  # fmt: skip
    new = standin.add_execution(a["id"], "success")
    del standin.workflows[b["id"]]
    standin.calls.clear()
    out = await refresh(api, editor, iid)
    assert (out["workflows"], out["workflows_removed"]) == (1, 1)
    listed = [c for c in standin.calls if c.path == "/api/v1/executions"]
    assert listed and all("startedAfter" in c.query for c in listed)
    # No detail call again for the failure we already know.
    assert not [c for c in standin.calls if c.path == f"/api/v1/executions/{bad['id']}"]
    r = await api.get(f"{URL}/{iid}/executions", headers=editor.headers,
                      params={"workflow_id": a["id"], "status": "success"})  # fmt: skip
    assert {e["n8n_id"] for e in r.json()["items"]} == {ok["id"], running["id"], new["id"]}
    r = await api.get(f"{URL}/{iid}/workflows/{b['id']}", headers=editor.headers)
    assert r.status_code == 404
    # A bad filter is a clear 422.
    r = await api.get(f"{URL}/{iid}/executions", headers=editor.headers, params={"status": "x"})
    assert r.status_code == 422 and field_of(r) == "status"


async def test_toggle_switches_it_on_the_instance_is_logged_and_has_a_quota(
    api: httpx.AsyncClient,
    editor: Actor,
    standin: StandIn,
    session: AsyncSession,
    team: Workspace,
) -> None:
    wf = standin.add_workflow("Leads")
    made = await connect(api, editor, standin)
    iid = made["id"]
    await refresh(api, editor, iid)
    path = f"{URL}/{iid}/workflows/{wf['id']}/toggle"
    r = await api.post(path, headers=editor.headers, json={"active": True})
    assert r.status_code == 200, r.text
    assert r.json()["active"] is True and standin.workflows[wf["id"]]["active"] is True
    r = await api.post(path, headers=editor.headers, json={"active": False})
    assert r.json()["active"] is False and standin.workflows[wf["id"]]["active"] is False
    logged = (
        await session.scalars(
            select(ActivityLog).where(
                ActivityLog.workspace_id == team.id, ActivityLog.action == "n8n.workflow.toggle"
            )
        )
    ).all()
    moves = sorted((e.details["from"], e.details["to"]) for e in logged)
    assert moves == [(False, True), (True, False)]
    # The workspace's quota: 2 toggles a day, both used.
    team.settings = {"quotas": {"n8n_toggles_per_day": 2, "n8n_refreshes_per_day": 1}}
    await session.flush()
    r = await api.post(path, headers=editor.headers, json={"active": True})
    assert r.status_code == 402 and r.json()["quota"] == "n8n_toggles_per_day"
    assert standin.workflows[wf["id"]]["active"] is False
    r = await api.post(f"{URL}/{iid}/refresh", headers=editor.headers)
    assert r.status_code == 402 and r.json()["error"] == "quota_exceeded"
    # A viewer reads, but may not toggle; bad bodies and unknown workflows are clear.
    viewer = await member(session, local_settings(), team, Role.VIEWER)
    viewer.headers["X-Workspace-ID"] = str(team.id)
    r = await api.post(path, headers=viewer.headers, json={"active": True})
    assert r.status_code == 403
    team.settings = {}
    await session.flush()
    r = await api.post(path, headers=editor.headers, json={"active": "maybe"})
    assert r.status_code == 422 and field_of(r) == "active"
    r = await api.post(f"{URL}/{iid}/workflows/nope/toggle", headers=editor.headers,
                       json={"active": True})  # fmt: skip
    assert r.status_code == 404
    r = await api.post(f"{URL}/{iid}/workflows/..%2Fx/toggle", headers=editor.headers,
                       json={"active": True})  # fmt: skip
    assert r.status_code in (404, 422)


def local_settings() -> Settings:
    from backend.config import get_settings

    return get_settings()


async def test_toggle_refused_by_n8n_is_a_502_with_its_message(
    api: httpx.AsyncClient, editor: Actor, standin: StandIn
) -> None:
    wf = standin.add_workflow("Leads")
    made = await connect(api, editor, standin)
    await refresh(api, editor, made["id"])
    standin.faults[:] = [400]
    r = await api.post(f"{URL}/{made['id']}/workflows/{wf['id']}/toggle",
                       headers=editor.headers, json={"active": True})  # fmt: skip
    assert r.status_code == 502 and "fault 400" in r.json()["detail"]


async def test_toggle_on_a_1x_instance_uses_activate(
    api: httpx.AsyncClient, editor: Actor, standin: StandIn
) -> None:
    standin.version = "1.123.4"
    wf = standin.add_workflow("Old")
    made = await connect(api, editor, standin)
    await refresh(api, editor, made["id"])
    r = await api.post(f"{URL}/{made['id']}/workflows/{wf['id']}/toggle",
                       headers=editor.headers, json={"active": True})  # fmt: skip
    assert r.status_code == 200 and standin.workflows[wf["id"]]["active"] is True
    r = await api.get(f"{URL}/{made['id']}", headers=editor.headers)
    assert r.json()["capabilities"]["legacy_publish"] is True


async def test_retry_runs_it_again_on_the_instance(
    api: httpx.AsyncClient, editor: Actor, standin: StandIn
) -> None:
    wf = standin.add_workflow("Sync")
    bad = standin.add_execution(wf["id"], "error", error="timeout", node="HTTP")
    made = await connect(api, editor, standin)
    await refresh(api, editor, made["id"])
    r = await api.post(f"{URL}/{made['id']}/executions/{bad['id']}/retry",
                       headers=editor.headers, json={"load_workflow": True})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["retry_of"] == bad["id"] and r.json()["status"] == "success"
    assert standin.calls[-1].body == {"loadWorkflow": True}
    ok = standin.add_execution(wf["id"], "success")
    await refresh(api, editor, made["id"])
    r = await api.post(f"{URL}/{made['id']}/executions/{ok['id']}/retry", headers=editor.headers)
    assert r.status_code == 502 and "cannot be retried" in r.json()["detail"]


async def test_error_workflow_installed_linked_and_the_intake_tells_watchers(
    api: httpx.AsyncClient,
    editor: Actor,
    standin: StandIn,
    session: AsyncSession,
) -> None:
    wf = standin.add_workflow("Payments")
    other = standin.add_workflow("Reports")
    made = await connect(api, editor, standin, notify={"emails": ["ops@example.com"]})
    iid = made["id"]
    await refresh(api, editor, iid)
    calls = len(standin.calls)
    r = await api.post(f"{URL}/{iid}/install-error-workflow", headers=editor.headers,
                       json={"workflow_ids": [wf["id"]], "all_workflows": True})  # fmt: skip
    assert (r.status_code, field_of(r)) == (422, "all_workflows"), r.text
    assert len(standin.calls) == calls  # nothing reached n8n
    r = await api.post(f"{URL}/{iid}/install-error-workflow", headers=editor.headers,
                       json={"workflow_ids": [wf["id"]]})  # fmt: skip
    assert r.status_code == 200, r.text
    out = r.json()
    handler = standin.workflows[out["error_workflow_id"]]
    assert out["created"] is True and out["linked"] == [wf["id"]] and handler["active"] is True
    assert [n["type"] for n in handler["nodes"]] == [
        "n8n-nodes-base.errorTrigger", "n8n-nodes-base.httpRequest",
    ]  # fmt: skip
    assert handler["nodes"][1]["parameters"]["url"] == out["intake_url"] == made["intake_url"]
    assert standin.workflows[wf["id"]]["settings"]["errorWorkflow"] == out["error_workflow_id"]
    assert "errorWorkflow" not in standin.workflows[other["id"]]["settings"]
    # Again: the same error workflow is updated, not a second one made.
    r = await api.post(f"{URL}/{iid}/install-error-workflow", headers=editor.headers,
                       json={"all_workflows": True})  # fmt: skip
    assert r.json()["created"] is False
    assert r.json()["error_workflow_id"] == out["error_workflow_id"]
    assert sorted(r.json()["linked"]) == sorted([wf["id"], other["id"]])
    # The editor watches Payments; a failure there reaches the intake as n8n sends it.
    r = await api.post(f"{URL}/{iid}/watches", headers=editor.headers,
                       json={"workflow_n8n_id": wf["id"]})  # fmt: skip
    assert r.status_code == 201
    payload, url = standin.fail(wf["id"], "Card declined", "Charge")
    assert url is not None and url == out["intake_url"]
    path = url.removeprefix("http://test")
    first = await api.post(path, json=payload)
    assert first.status_code == 202, first.text
    assert first.json()["new"] is True
    again = await api.post(path, json=payload)
    assert again.json() == {"error_id": first.json()["error_id"], "new": False}
    row = await session.get(N8nError, uuid.UUID(first.json()["error_id"]))
    assert row is not None and row.reports == 2
    assert (row.node, row.message, row.workflow_name) == ("Charge", "Card declined", "Payments")
    assert row.workflow_id is not None
    assert row.notified["users"] == [str(editor.user.id)]
    assert set(row.notified["emails"]) == {editor.user.email, "ops@example.com"}
    notes = (
        await session.scalars(
            select(UserNotification).where(UserNotification.user_id == editor.user.id)
        )
    ).all()
    assert len(notes) == 1 and notes[0].kind == "n8n.error" and "Card declined" in notes[0].body
    r = await api.get(f"{URL}/{iid}/errors", headers=editor.headers)
    assert r.json()["total"] == 1 and r.json()["items"][0]["execution_n8n_id"] == payload[
        "execution"]["id"]  # fmt: skip
    r = await api.get(f"{URL}/{iid}/executions", headers=editor.headers, params={"status": "error"})
    assert r.json()["items"][0]["error_message"] == "Card declined"
    # A failure of a workflow nobody watches tells only the instance's own addresses.
    payload, _ = standin.fail(other["id"], "Disk full", "Write")
    r = await api.post(path, json=payload)
    row = await session.get(N8nError, uuid.UUID(r.json()["error_id"]))
    assert row is not None and row.notified["users"] == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([1, 2], "body"),
        ({"workflow": "x", "execution": {}}, "workflow"),
        ({"workflow": {"id": "1"}}, "execution"),
    ],
)
async def test_intake_refuses_what_is_not_an_error_report(
    api: httpx.AsyncClient, editor: Actor, standin: StandIn, body: Any, field: str
) -> None:
    made = await connect(api, editor, standin)
    path = made["intake_url"].removeprefix("http://test")
    r = await api.post(path, json=body)
    assert r.status_code == 422 and field_of(r) == field
    r = await api.post(path, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = await api.post("/api/v1/hooks/n8n/n8n_unknown", json={"workflow": {}, "execution": {}})
    assert r.status_code == 404


async def test_another_workspace_sees_nothing(
    api: httpx.AsyncClient, editor: Actor, standin: StandIn, session: AsyncSession
) -> None:
    from tests.support.identity import make_workspace

    made = await connect(api, editor, standin)
    elsewhere = await make_workspace(session)
    outsider = await member(session, local_settings(), elsewhere, Role.OWNER)
    outsider.headers["X-Workspace-ID"] = str(elsewhere.id)
    for method, suffix in (("GET", ""), ("POST", "/test"), ("GET", "/workflows"),
                           ("DELETE", ""), ("POST", "/refresh")):  # fmt: skip
        r = await api.request(method, f"{URL}/{made['id']}{suffix}", headers=outsider.headers)
        assert r.status_code == 404, (method, suffix)
    assert (await api.get(URL, headers=outsider.headers)).json()["total"] == 0
    r = await api.delete(f"{URL}/{made['id']}", headers=editor.headers)
    assert r.status_code == 204
    assert (await api.get(f"{URL}/{made['id']}", headers=editor.headers)).status_code == 404
