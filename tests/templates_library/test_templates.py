"""Templates: the library over HTTP, instantiation into validated drafts, publishing a
workspace's own, and every built-in template run by the engine against local servers
(HTTP target, Messages API, SMTP)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.permissions import Role
from backend.config import Settings, StorageSettings
from backend.kit.db import UnitOfWork
from backend.kit.http_guard import guarded_client
from backend.models import Workspace
from backend.templates_library.library import BY_ID, TEMPLATES, substitute
from backend.workflows.graph import Context, validate
from tests.support.engine import Enqueued, node_settings, start, state
from tests.support.factories import AgentFactory, CredentialFactory, create, make_agent
from tests.support.fake_anthropic import fake_anthropic
from tests.support.identity import Actor, make_workspace, member
from tests.support.mail import Mailbox
from tests.support.target import Target, http_target
from workers.engine.runner import Runner

API = "/api/v1/templates"


def params_for(
    template_id: str, agent: str, credential: str, base: str = "https://api.example.com"
) -> dict[str, str]:
    values = {
        "agent": agent, "researcher": agent, "writer": agent, "credential": credential,
        "email": "ops@example.com", "url": f"{base}/items", "orders_url": f"{base}/orders",
        "other_url": f"{base}/other", "status_url": f"{base}/job",
    }  # fmt: skip
    names = {p.name for p in BY_ID[template_id].parameters}
    return {k: v for k, v in values.items() if k in names}


async def test_the_library_lists_at_least_eight_templates_with_parameters_and_previews(
    client: httpx.AsyncClient, editor: Actor
) -> None:
    r = await client.get(API, headers=editor.headers)
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert len(items) >= 8 and r.json()["total"] == len(items)
    for item in items:
        assert item["description"] and item["preview"]["nodes"]
        assert {n["type"] for n in item["preview"]["nodes"]} <= {
            "trigger", "agent", "action", "logic", "integration",
        }  # fmt: skip
    one = await client.get(f"{API}/webhook-agent-notify", headers=editor.headers)
    assert {p["name"] for p in one.json()["parameters"]} == {"agent", "email"}
    assert one.json()["definition"]["nodes"][1]["config"]["agent_id"] == "<<agent>>"
    assert (await client.get(f"{API}/nope", headers=editor.headers)).status_code == 404
    assert (await client.get(f"{API}/{uuid.uuid4()}", headers=editor.headers)).status_code == 404
    bad = await client.get(f"{API}/..%2Fetc", headers=editor.headers)
    assert bad.status_code in (404, 422)


async def test_every_template_instantiates_into_a_valid_draft(
    client: httpx.AsyncClient, session: AsyncSession, team: Workspace, editor: Actor
) -> None:
    agent = await make_agent(session, team)
    cred = await create(session, CredentialFactory, workspace_id=team.id)
    for template in TEMPLATES:
        body = {"parameters": params_for(template.id, str(agent.id), str(cred.id))}
        r = await client.post(f"{API}/{template.id}/instantiate", headers=editor.headers, json=body)
        assert r.status_code == 201, (template.id, r.text)
        wf = r.json()
        assert wf["status"] == "draft" and wf["tags"] == ["template"]
        assert "<<" not in json.dumps(wf["nodes"])


async def test_instantiate_refuses_bad_parameters_with_the_field(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    team: Workspace,
    editor: Actor,
) -> None:
    url = f"{API}/webhook-agent-notify/instantiate"
    elsewhere = await make_workspace(session, "Elsewhere")
    foreign = await make_agent(session, elsewhere)
    cases = [
        ({"email": "a@b.c"}, "parameters.agent"),
        ({"agent": "not-a-uuid", "email": "a@b.c"}, "parameters.agent"),
        ({"agent": str(uuid.uuid4()), "email": "a@b.c", "extra": "x"}, "parameters.extra"),
        ({"agent": str(foreign.id), "email": "a@b.c"}, "nodes.think.config.agent_id"),
    ]
    for params, field in cases:
        r = await client.post(url, headers=editor.headers, json={"parameters": params})
        assert r.status_code == 422, r.text
        assert r.json()["field"] == field, r.json()
    listed = await client.get("/api/v1/workflows", headers=editor.headers)
    assert listed.json()["total"] == 0
    viewer = await member(session, settings, team, Role.VIEWER)
    viewer.headers["X-Workspace-ID"] = str(team.id)
    r = await client.post(url, headers=viewer.headers, json={"parameters": {}})
    assert r.status_code == 403


async def test_a_workspace_publishes_its_own_template_for_its_members_only(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    team: Workspace,
    editor: Actor,
) -> None:
    agent = await make_agent(session, team)
    made = await client.post(
        f"{API}/webhook-agent-notify/instantiate",
        headers=editor.headers,
        json={"parameters": {"agent": str(agent.id), "email": "a@b.c"}, "name": "Mine"},
    )
    wf = made.json()
    r = await client.post(
        API, headers=editor.headers, json={"workflow_id": wf["id"], "category": "team"}
    )
    assert r.status_code == 201, r.text
    published = r.json()
    assert published["source"] == "workspace" and published["name"] == "Mine"
    assert published["parameters"] == [
        {"name": "agent_1", "kind": "agent", "description": "The agent to use",
         "required": True, "default": str(agent.id)},
    ]  # fmt: skip
    again = await client.post(API, headers=editor.headers, json={"workflow_id": wf["id"]})
    assert again.status_code == 409
    listed = await client.get(API, headers=editor.headers, params={"category": "team"})
    assert [i["id"] for i in listed.json()["items"]] == [published["id"]]
    copy = await client.post(
        f"{API}/{published['id']}/instantiate", headers=editor.headers, json={}
    )
    assert copy.status_code == 201, copy.text
    # Another workspace sees neither the template nor the workflow.
    other_ws = await make_workspace(session, "Other")
    outsider = await member(session, settings, other_ws, Role.OWNER)
    outsider.headers["X-Workspace-ID"] = str(other_ws.id)
    r = await client.get(f"{API}/{published['id']}", headers=outsider.headers)
    assert r.status_code == 404
    r = await client.post(API, headers=outsider.headers, json={"workflow_id": wf["id"]})
    assert r.status_code == 404
    assert (
        await client.delete(f"{API}/webhook-agent-notify", headers=editor.headers)
    ).status_code == 409
    assert (
        await client.delete(f"{API}/{published['id']}", headers=editor.headers)
    ).status_code == 204


# Every template runs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    with http_target() as t:
        yield t


@pytest.fixture(scope="module")
def llm() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    with fake_anthropic() as server:
        yield server


@pytest.fixture
async def runner(
    settings: Settings,
    maker: async_sessionmaker[AsyncSession],
    tmp_path: Path,
    mailbox: Mailbox,
    smtp_port: int,
    llm: tuple[str, list[dict[str, Any]]],
) -> AsyncIterator[Runner]:
    local = node_settings(settings, StorageSettings(local_root=str(tmp_path)), smtp_port)
    local = local.model_copy(
        update={
            "anthropic": local.anthropic.model_copy(
                update={"api_key": SecretStr("k"), "base_url": llm[0], "max_retries": 0}
            )
        }
    )
    async with guarded_client(["127.0.0.1/32"]) as http:
        yield Runner(local, maker, http, f"tpl-{uuid.uuid4().hex[:6]}", Enqueued())


TRIGGERS: dict[str, dict[str, Any]] = {
    "for-each-agent": {"items": ["a", "b"]},
    "research-then-write": {"topic": "otters"},
    "webhook-router": {"type": "order"},
}


@pytest.mark.parametrize("template_id", [t.id for t in TEMPLATES])
async def test_every_template_runs(
    template_id: str,
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    target: Target,
    tmp_path: Path,
) -> None:
    async with UnitOfWork(maker) as uow:
        agent = await create(uow.session, AgentFactory, workspace_id=workspace.id)
        cred = await create(uow.session, CredentialFactory, workspace_id=workspace.id)
    params = params_for(template_id, str(agent.id), str(cred.id), target.base)
    for p in BY_ID[template_id].parameters:
        params.setdefault(p.name, p.default)
    definition = substitute(BY_ID[template_id].definition, params)
    validate(
        definition,
        Context(agent_ids=frozenset({agent.id}), credential_ids=frozenset({cred.id})),
    )
    records = tmp_path / str(workspace.id) / "imports" / "records.json"
    records.parent.mkdir(parents=True, exist_ok=True)
    records.write_text(json.dumps([{"id": 1, "active": True}, {"id": 2, "active": False}]))
    execution_id = await start(maker, workspace, definition, TRIGGERS.get(template_id, {}))
    status = await runner.execute(execution_id)
    run, nodes = await state(maker, execution_id)
    assert status == "completed", (run.error, {k: v.error for k, v in nodes.items()})
    if template_id == "file-cleanup":
        written = json.loads((tmp_path / str(workspace.id) / "exports" / "active.json").read_text())
        assert written == [{"id": 1, "active": True}]
    if template_id == "webhook-router":
        assert nodes["other"].status == "skipped" and nodes["orders"].status == "completed"
