"""/api/v1/workflows as a client uses it: CRUD, versions, concurrency, status,
duplicate, export and import, and every bad graph explained with its place."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.permissions import Role
from backend.config import Settings
from backend.models import WorkflowVersion, Workspace
from tests.support.factories import MINIMAL, make_agent, make_credential
from tests.support.identity import Actor, make_workspace, member

API = "/api/v1/workflows"


async def create(
    client: httpx.AsyncClient,
    actor: Actor,
    name: str = "Flow",
    definition: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    body = {"name": name, **copy.deepcopy(definition or MINIMAL), **extra}
    r = await client.post(API, headers=actor.headers, json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def test_create_get_and_list_with_filters(client: httpx.AsyncClient, editor: Actor) -> None:
    a = await create(
        client, editor, "Invoice sync", description="pulls invoices", tags=["billing", "nightly"]
    )
    await create(client, editor, "Lead router", tags=["sales"])
    assert a["status"] == "draft"
    assert a["version"] == 1
    assert a["nodes"][0]["position"] == {"x": 0, "y": 0}
    got = (await client.get(f"{API}/{a['id']}", headers=editor.headers)).json()
    assert got == a

    async def names(**params: Any) -> list[str]:
        r = await client.get(API, headers=editor.headers, params=params)
        assert r.status_code == 200, r.text
        return [w["name"] for w in r.json()["items"]]

    assert await names(tag="billing") == ["Invoice sync"]
    assert await names(q="INVOICES") == ["Invoice sync"]
    assert await names(q="100%") == []
    assert await names(sort="name") == ["Invoice sync", "Lead router"]
    assert await names(sort="-name", limit=1) == ["Lead router"]
    assert await names(status="published") == []
    page = (
        await client.get(
            API, headers=editor.headers, params={"limit": 1, "offset": 1, "sort": "name"}
        )
    ).json()
    assert (page["total"], page["limit"], page["offset"], len(page["items"])) == (2, 1, 1, 1)
    assert (await client.get(API, headers=editor.headers, params={"limit": 500})).status_code == 422
    assert (
        await client.get(API, headers=editor.headers, params={"sort": "password"})
    ).status_code == 422


async def test_list_needs_a_workspace(client: httpx.AsyncClient, editor: Actor) -> None:
    headers = {k: v for k, v in editor.headers.items() if k != "X-Workspace-ID"}
    r = await client.get(API, headers=headers)
    assert (r.status_code, r.json()["field"]) == (422, "X-Workspace-ID")


async def test_each_save_of_the_graph_is_a_new_immutable_version(
    client: httpx.AsyncClient, session: AsyncSession, editor: Actor
) -> None:
    wf = await create(client, editor)
    changed = copy.deepcopy(MINIMAL)
    changed["nodes"][1]["config"]["template"] = '{"ok": false}'
    r = await client.put(
        f"{API}/{wf['id']}", headers=editor.headers, json={"nodes": changed["nodes"], "version": 1}
    )
    assert (r.status_code, r.json()["version"]) == (200, 2)
    # Renaming alone makes no new version.
    r = await client.put(f"{API}/{wf['id']}", headers=editor.headers, json={"name": "Renamed"})
    assert (r.json()["version"], r.json()["name"]) == (2, "Renamed")
    versions = (await client.get(f"{API}/{wf['id']}/versions", headers=editor.headers)).json()
    assert [v["number"] for v in versions["items"]] == [2, 1]
    v1 = (await client.get(f"{API}/{wf['id']}/versions/1", headers=editor.headers)).json()
    assert v1["definition"]["nodes"][1]["config"]["template"] == '{"ok": true}'
    assert (
        await client.get(f"{API}/{wf['id']}/versions/9", headers=editor.headers)
    ).status_code == 404
    rows = (
        await session.scalars(
            select(WorkflowVersion.number).where(WorkflowVersion.workflow_id == uuid.UUID(wf["id"]))
        )
    ).all()
    assert sorted(rows) == [1, 2]


async def test_an_outdated_version_is_a_conflict_not_an_overwrite(
    client: httpx.AsyncClient, editor: Actor
) -> None:
    wf = await create(client, editor)
    nodes = copy.deepcopy(MINIMAL["nodes"])
    assert (
        await client.put(
            f"{API}/{wf['id']}",
            headers=editor.headers,
            json={"nodes": nodes, "settings": {"timeout_s": 60}, "version": 1},
        )
    ).status_code == 200
    r = await client.put(
        f"{API}/{wf['id']}",
        headers=editor.headers,
        json={"settings": {"timeout_s": 30}, "version": 1},
    )
    assert r.status_code == 409
    assert (r.json()["field"], r.json()["current_version"]) == ("version", 2)
    r = await client.put(
        f"{API}/{wf['id']}",
        headers={**editor.headers, "If-Match": '"1"'},
        json={"settings": {"timeout_s": 30}},
    )
    assert r.status_code == 409
    r = await client.put(
        f"{API}/{wf['id']}",
        headers={**editor.headers, "If-Match": '"2"'},
        json={"settings": {"timeout_s": 30}},
    )
    assert (r.status_code, r.json()["version"], r.json()["settings"]) == (200, 3, {"timeout_s": 30})


async def test_a_bad_graph_is_explained_with_its_place(
    client: httpx.AsyncClient, editor: Actor
) -> None:
    bad = copy.deepcopy(MINIMAL)
    bad["nodes"][1]["config"]["template"] = "{{ nodes.later.value }}"
    r = await client.post(API, headers=editor.headers, json={"name": "Bad", **bad})
    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "validation_error"
    assert body["field"] == "nodes.shape.config.template"
    assert body["problems"] == [
        {
            "node_id": "shape",
            "field": "config.template",
            "message": "refers to node 'later', which does not exist",
        }
    ]
    # Nothing was stored.
    assert (await client.get(API, headers=editor.headers)).json()["total"] == 0


async def test_a_definition_too_large_to_parse_quickly_is_refused_before_parsing(
    client: httpx.AsyncClient, editor: Actor
) -> None:
    """Parsing templates costs seconds per megabyte: 500 nodes of 20 000-character
    templates held a process for 45 s. A definition over 2 000 000 characters is refused
    whole, before any template is parsed."""
    big = copy.deepcopy(MINIMAL)
    template = "{{ trigger.a }}" * 1300  # under the per-template cap of 20 000
    shape = big["nodes"][1]
    big["nodes"][1:] = [
        {**shape, "id": f"n{i}", "config": {**shape["config"], "template": template}}
        for i in range(120)
    ]
    big["connections"] = [{"source": big["nodes"][0]["id"], "target": f"n{i}"} for i in range(120)]
    r = await client.post(API, headers=editor.headers, json={"name": "Big", **big})
    assert (r.status_code, r.json()["field"]) == (422, "nodes"), r.text[:300]
    assert "at most 2000000" in r.json()["detail"]
    assert (await client.get(API, headers=editor.headers)).json()["total"] == 0


async def test_status_moves_draft_published_archived_draft_only(
    client: httpx.AsyncClient, editor: Actor
) -> None:
    wf = await create(client, editor)
    url = f"{API}/{wf['id']}/status"
    for target, code in [
        ("archived", 409),
        ("published", 200),
        ("draft", 409),
        ("published", 409),
        ("archived", 200),
        ("published", 409),
        ("draft", 200),
    ]:
        r = await client.patch(url, headers=editor.headers, json={"status": target})
        assert r.status_code == code, (target, r.text)
        if code == 409:
            assert r.json()["error"] == "invalid_transition"


async def test_duplicate_and_delete(client: httpx.AsyncClient, editor: Actor) -> None:
    wf = await create(client, editor, "Original", tags=["x"])
    r = await client.post(f"{API}/{wf['id']}/duplicate", headers=editor.headers)
    assert r.status_code == 201
    copy_ = r.json()
    assert (copy_["name"], copy_["status"], copy_["version"], copy_["tags"]) == (
        "Copy of Original",
        "draft",
        1,
        ["x"],
    )
    assert copy_["nodes"] == wf["nodes"]
    assert copy_["id"] != wf["id"]
    assert (await client.delete(f"{API}/{wf['id']}", headers=editor.headers)).status_code == 204
    assert (await client.get(f"{API}/{wf['id']}", headers=editor.headers)).status_code == 404


async def test_a_workflow_called_by_another_cannot_be_deleted(
    client: httpx.AsyncClient, editor: Actor
) -> None:
    child = await create(client, editor, "Child")
    parent_def = copy.deepcopy(MINIMAL)
    parent_def["nodes"].append(
        {
            "id": "call",
            "type": "integration",
            "config": {"kind": "sub_workflow", "workflow_id": child["id"]},
        }
    )
    parent_def["connections"].append({"source": "shape", "target": "call"})
    await create(client, editor, "Parent", parent_def)
    r = await client.delete(f"{API}/{child['id']}", headers=editor.headers)
    assert (r.status_code, r.json()["workflows"]) == (409, ["Parent"])
    # And the child cannot now call its parent: that would recurse.
    parent_id = (await client.get(API, headers=editor.headers, params={"q": "Parent"})).json()[
        "items"
    ][0]["id"]
    loop = copy.deepcopy(MINIMAL)
    loop["nodes"].append(
        {
            "id": "back",
            "type": "integration",
            "config": {"kind": "sub_workflow", "workflow_id": parent_id},
        }
    )
    loop["connections"].append({"source": "shape", "target": "back"})
    r = await client.put(
        f"{API}/{child['id']}",
        headers=editor.headers,
        json={"nodes": loop["nodes"], "connections": loop["connections"]},
    )
    assert r.status_code == 422
    assert r.json()["field"] == "nodes.back.config.workflow_id"


async def test_export_import_round_trip_with_references_remapped(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    team: Workspace,
    editor: Actor,
) -> None:
    agent = await make_agent(session, team)
    credential = await make_credential(session, team)
    definition = copy.deepcopy(MINIMAL)
    definition["nodes"] += [
        {
            "id": "fetch",
            "type": "action",
            "config": {
                "kind": "http_request",
                "url": "https://api.example.com",
                "credential_id": str(credential.id),
            },
        },
        {
            "id": "think",
            "type": "agent",
            "config": {"agent_id": str(agent.id), "prompt": "{{ nodes.fetch.output }}"},
        },
    ]
    definition["connections"] += [
        {"source": "shape", "target": "fetch"},
        {"source": "fetch", "target": "think"},
    ]
    wf = await create(client, editor, "Exported", definition, tags=["t"])
    doc = (await client.get(f"{API}/{wf['id']}/export", headers=editor.headers)).json()
    assert doc["format"] == "orchestration-studio.workflow"
    assert doc["references"] == {"agent_id": [str(agent.id)], "credential_id": [str(credential.id)]}

    # Same workspace: imports as is.
    r = await client.post(f"{API}/import", headers=editor.headers, json={"document": doc})
    assert r.status_code == 201, r.text
    assert r.json()["nodes"] == wf["nodes"]
    assert r.json()["id"] != wf["id"]

    # Another workspace: its references do not exist there until mapped.
    other = await make_workspace(session, "Other")
    there = await member(session, settings, other, Role.EDITOR)
    there.headers["X-Workspace-ID"] = str(other.id)
    r = await client.post(f"{API}/import", headers=there.headers, json={"document": doc})
    assert r.status_code == 422
    fields = {p["field"] for p in r.json()["problems"]}
    assert fields == {"config.credential_id", "config.agent_id"}
    agent2, credential2 = await make_agent(session, other), await make_credential(session, other)
    id_map = {str(agent.id): str(agent2.id), str(credential.id): str(credential2.id)}
    body = {"document": doc, "id_map": id_map, "name": "Imported"}
    r = await client.post(f"{API}/import", headers=there.headers, json=body)
    assert r.status_code == 201, r.text
    imported = r.json()
    assert imported["name"] == "Imported"
    assert imported["workspace_id"] == str(other.id)
    by_id = {n["id"]: n for n in imported["nodes"]}
    assert by_id["think"]["config"]["agent_id"] == str(agent2.id)
    assert by_id["fetch"]["config"]["credential_id"] == str(credential2.id)


async def test_unknown_fields_and_ids_in_bodies_are_refused(
    client: httpx.AsyncClient, editor: Actor
) -> None:
    for field in ("id", "workspace_id", "status", "created_by", "current_version"):
        r = await client.post(API, headers=editor.headers, json={"name": "X", field: "x"})
        assert r.status_code == 422, field
        assert r.json()["fields"][0]["field"] == field


async def test_malformed_imports_are_422_not_500(client: httpx.AsyncClient, editor: Actor) -> None:
    for definition in (
        {"nodes": 5},
        {"nodes": None},
        {
            "nodes": [
                {"id": "t", "type": "trigger", "config": {"kind": "for_each", "body": {"nodes": 7}}}
            ]
        },
    ):
        r = await client.post(
            f"{API}/import",
            headers=editor.headers,
            json={"document": {"name": "x", "definition": definition}},
        )
        assert r.status_code == 422, r.text


async def test_version_and_if_match_must_agree(client: httpx.AsyncClient, editor: Actor) -> None:
    wf = await create(client, editor)
    r = await client.put(
        f"{API}/{wf['id']}",
        headers={**editor.headers, "If-Match": "1"},
        json={"version": 2, "name": "x"},
    )
    assert (r.status_code, r.json()["field"]) == (422, "version")
