"""Suggestions over HTTP, on run history written into the test's rolled-back transaction:
refresh, list and read, accept (a new version; 409 when stale or decided; 422 when the
patch no longer validates), dismiss, findings that go away, and the activity log."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.permissions import Role
from backend.config import Settings
from backend.models import Credential, WorkflowSuggestion, Workspace
from tests.suggestions.history import add_run, failed, ok
from tests.support.factories import CredentialFactory, create
from tests.support.identity import Actor, member

API = "/api/v1/workflows"


def definition(cred: Credential) -> dict[str, Any]:
    return {
        "nodes": [
            {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
            {"id": "fetch", "type": "action", "retry": {"max_retries": 0},
             "config": {"kind": "http_request", "url": "https://api.example.com/items"}},
            {"id": "check", "type": "logic",
             "config": {"kind": "if", "condition": "nodes.fetch.output.status == 200"}},
            {"id": "done", "type": "logic", "config": {"kind": "transform", "template": "ok"}},
            {"id": "page", "type": "action",
             "config": {"kind": "http_request", "url": "https://pager.example.com/",
                        "method": "POST", "credential_id": str(cred.id)}},
        ],
        "connections": [
            {"source": "start", "target": "fetch"}, {"source": "fetch", "target": "check"},
            {"source": "check", "target": "done", "branch": "true"},
            {"source": "check", "target": "page", "branch": "false"},
        ],
    }  # fmt: skip


async def flaky_workflow(
    client: httpx.AsyncClient, session: AsyncSession, team: Workspace, editor: Actor
) -> dict[str, Any]:
    """A workflow whose fetch failed 3 times on 5xx with no retries, and whose check
    took `true` in all of its 5 other runs."""
    cred = await create(session, CredentialFactory, workspace_id=team.id, name="Pager")
    r = await client.post(API, headers=editor.headers, json={"name": "Digest", **definition(cred)})
    assert r.status_code == 201, r.text
    wf: dict[str, Any] = r.json()
    wf_id = uuid.UUID(wf["id"])
    for _ in range(3):
        await add_run(session, team.id, wf_id, {"start": ok(1), "fetch": failed("server_error")})
    for _ in range(5):
        await add_run(
            session, team.id, wf_id,
            {"start": ok(1), "fetch": ok(80), "check": ok(1, branch="true"), "done": ok(1)},
        )  # fmt: skip
    return wf


async def test_refresh_finds_the_history_and_accepting_makes_versions(
    client: httpx.AsyncClient, session: AsyncSession, team: Workspace, editor: Actor
) -> None:
    wf = await flaky_workflow(client, session, team, editor)
    url = f"{API}/{wf['id']}/suggestions"
    empty = await client.get(url, headers=editor.headers)
    assert (empty.status_code, empty.json()["total"]) == (200, 0)

    r = await client.post(f"{url}/refresh", headers=editor.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["added"], body["resolved"]) == (2, 0)
    by_kind = {s["kind"]: s for s in body["items"]}
    assert set(by_kind) == {"missing_retry", "dead_branch"}
    retry, branch = by_kind["missing_retry"], by_kind["dead_branch"]
    assert retry["evidence"]["transient_failures"] == {"server_error": 3}
    assert "fetch failed 3 times in the last 30 days" in retry["reason"]
    assert retry["diff"]["nodes_changed"] == [{"id": "fetch", "fields": ["retry"]}]
    assert (retry["status"], retry["source"], retry["base_version"], retry["stale"]) == (
        "open", "history", 1, False,
    )  # fmt: skip
    # The false branch was never taken: it goes with the pager, and frees its credential.
    assert branch["evidence"]["nodes_removed"] == ["page"]
    assert branch["evidence"]["credentials_freed"][0]["name"] == "Pager"
    assert branch["diff"]["nodes_removed"] == ["page"]

    one = await client.get(f"{url}/{retry['id']}", headers=editor.headers)
    assert one.json()["reason"] == retry["reason"]
    listed = await client.get(url, headers=editor.headers, params={"kind": "dead_branch"})
    assert [s["id"] for s in listed.json()["items"]] == [branch["id"]]

    accepted = await client.post(f"{url}/{retry['id']}/accept", headers=editor.headers)
    assert accepted.status_code == 200, accepted.text
    out = accepted.json()
    assert out["workflow"]["version"] == 2
    fetch = next(n for n in out["workflow"]["nodes"] if n["id"] == "fetch")
    assert fetch["retry"]["max_retries"] == 3 and "server_error" in fetch["retry"]["on"]
    assert out["suggestion"]["status"] == "accepted"
    assert out["suggestion"]["decided_by"] == str(editor.user.id)
    again = await client.post(f"{url}/{retry['id']}/accept", headers=editor.headers)
    assert (again.status_code, again.json()["field"]) == (409, "status")

    # The branch suggestion was made for version 1: stale, and refused until refreshed.
    stale = (await client.get(f"{url}/{branch['id']}", headers=editor.headers)).json()
    assert stale["stale"] is True
    r = await client.post(f"{url}/{branch['id']}/accept", headers=editor.headers)
    assert r.status_code == 409, r.text
    assert (r.json()["field"], r.json()["current_version"]) == ("base_version", 2)
    refreshed = (await client.post(f"{url}/refresh", headers=editor.headers)).json()
    # The retry is not found again (the node has one now) and stays accepted.
    assert (refreshed["added"], refreshed["refreshed"], refreshed["resolved"]) == (0, 1, 0)
    assert [s["id"] for s in refreshed["items"]] == [branch["id"]]
    assert refreshed["items"][0]["base_version"] == 2
    r = await client.post(f"{url}/{branch['id']}/accept", headers=editor.headers)
    assert r.status_code == 200, r.text
    assert r.json()["workflow"]["version"] == 3
    assert {n["id"] for n in r.json()["workflow"]["nodes"]} == {"start", "fetch", "check", "done"}

    decided = await client.get(url, headers=editor.headers, params={"status": "accepted"})
    assert decided.json()["total"] == 2
    log = await client.get(
        f"/api/v1/workspaces/{team.id}/activity",
        headers=editor.headers,
        params={"action": "workflow.suggestion.accept"},
    )
    assert log.status_code == 200, log.text
    details = [i["details"] for i in log.json()["items"]]
    assert {(d["kind"], d["version"]) for d in details} == {
        ("missing_retry", 2), ("dead_branch", 3),
    }  # fmt: skip


async def test_dismissed_stays_dismissed_and_a_finding_that_went_away_is_resolved(
    client: httpx.AsyncClient, session: AsyncSession, team: Workspace, editor: Actor
) -> None:
    wf = await flaky_workflow(client, session, team, editor)
    url = f"{API}/{wf['id']}/suggestions"
    items = (await client.post(f"{url}/refresh", headers=editor.headers)).json()["items"]
    branch = next(s for s in items if s["kind"] == "dead_branch")
    r = await client.post(f"{url}/{branch['id']}/dismiss", headers=editor.headers)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "dismissed" and r.json()["decided_at"]
    again = (await client.post(f"{url}/refresh", headers=editor.headers)).json()
    assert again["added"] == 0
    assert [s["kind"] for s in again["items"]] == ["missing_retry"]
    for action in ("dismiss", "accept"):
        r = await client.post(f"{url}/{branch['id']}/{action}", headers=editor.headers)
        assert r.status_code == 409, r.text
    # Someone adds the retry by hand: the finding is gone on the next recompute.
    current = (await client.get(f"{API}/{wf['id']}", headers=editor.headers)).json()
    nodes = [
        {**n, "retry": {"max_retries": 2}} if n["id"] == "fetch" else n for n in current["nodes"]
    ]
    put = await client.put(
        f"{API}/{wf['id']}", headers=editor.headers, json={"nodes": nodes, "version": 1}
    )
    assert put.status_code == 200, put.text
    gone = (await client.post(f"{url}/refresh", headers=editor.headers)).json()
    assert (gone["resolved"], gone["items"]) == (1, [])
    everything = await client.get(url, headers=editor.headers, params={"status": "all"})
    assert [s["status"] for s in everything.json()["items"]] == ["dismissed"]
    log = await client.get(
        f"/api/v1/workspaces/{team.id}/activity",
        headers=editor.headers,
        params={"action": "workflow.suggestion.dismiss"},
    )
    assert log.json()["items"][0]["details"]["suggestion_id"] == branch["id"]


async def test_accepting_a_patch_that_no_longer_validates_is_422_and_changes_nothing(
    client: httpx.AsyncClient, session: AsyncSession, team: Workspace, editor: Actor
) -> None:
    wf = await flaky_workflow(client, session, team, editor)
    bad = WorkflowSuggestion(
        workspace_id=team.id, workflow_id=uuid.UUID(wf["id"]), kind="other",
        fingerprint="model:x", source="model", reason="r", base_version=1,
        patch=[{"op": "set_node_field", "node_id": "fetch", "field": "config.method",
                "value": "FETCH"}],
    )  # fmt: skip
    broken = WorkflowSuggestion(
        workspace_id=team.id, workflow_id=uuid.UUID(wf["id"]), kind="other",
        fingerprint="model:y", source="model", reason="r", base_version=1,
        patch=[{"op": "remove_node", "node_id": "nope"}],
    )  # fmt: skip
    session.add_all([bad, broken])
    await session.flush()
    url = f"{API}/{wf['id']}/suggestions"
    r = await client.post(f"{url}/{bad.id}/accept", headers=editor.headers)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "nodes.fetch.config.method"
    r = await client.post(f"{url}/{broken.id}/accept", headers=editor.headers)
    assert (r.status_code, r.json()["field"]) == (422, "patch")
    assert "no node 'nope'" in r.json()["detail"]
    after = (await client.get(f"{API}/{wf['id']}", headers=editor.headers)).json()
    assert after["version"] == 1
    listed = (await client.get(url, headers=editor.headers, params={"source": "model"})).json()
    assert {s["status"] for s in listed["items"]} == {"open"}


async def test_suggestions_belong_to_their_workflow_and_roles_are_checked(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    team: Workspace,
    editor: Actor,
) -> None:
    wf = await flaky_workflow(client, session, team, editor)
    items = (
        await client.post(f"{API}/{wf['id']}/suggestions/refresh", headers=editor.headers)
    ).json()["items"]
    other = await client.post(
        API,
        headers=editor.headers,
        json={"name": "Other", "nodes": [{"id": "s", "type": "trigger",
                                           "config": {"kind": "manual"}}]},
    )  # fmt: skip
    sid = items[0]["id"]
    for method, path in (("GET", ""), ("POST", "/accept"), ("POST", "/dismiss")):
        r = await client.request(
            method, f"{API}/{other.json()['id']}/suggestions/{sid}{path}", headers=editor.headers
        )
        assert (r.status_code, r.json()["detail"]) == (404, "suggestion not found"), path
    r = await client.get(f"{API}/{wf['id']}/suggestions/not-a-uuid", headers=editor.headers)
    assert r.status_code == 422
    r = await client.get(
        f"{API}/{wf['id']}/suggestions", headers=editor.headers, params={"status": "nope"}
    )
    assert r.status_code == 422
    viewer = await member(session, settings, team, Role.VIEWER)
    viewer.headers["X-Workspace-ID"] = str(team.id)
    assert (
        await client.get(f"{API}/{wf['id']}/suggestions", headers=viewer.headers)
    ).status_code == 200
    r = await client.post(f"{API}/{wf['id']}/suggestions/{sid}/accept", headers=viewer.headers)
    assert r.status_code == 403
    still = await client.get(f"{API}/{wf['id']}/suggestions/{sid}", headers=editor.headers)
    assert still.json()["status"] == "open"
