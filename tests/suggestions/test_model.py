"""Suggestions from the model, through the real anthropic SDK against the local
Messages-API server: a patch that does not apply is sent back and fixed in a repair
round, one that stays invalid comes back rejected, spend limit 402, no key 424."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.main import create_app
from backend.models import Workspace
from tests.suggestions.history import add_run, failed, ok
from tests.support.asgi import client_for
from tests.support.fake_anthropic import fake_anthropic, script
from tests.support.identity import Actor

API = "/api/v1/workflows"
Server = tuple[str, list[dict[str, Any]]]


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with fake_anthropic() as s:
        yield s


@pytest.fixture
async def llm(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], server: Server
) -> AsyncIterator[httpx.AsyncClient]:
    configured = settings.model_copy(
        update={
            "anthropic": settings.anthropic.model_copy(
                update={"api_key": SecretStr("sk-test-local"), "base_url": server[0]}
            )
        }
    )
    async for c in client_for(create_app(configured), sessionmaker):
        yield c


DEFINITION = {
    "nodes": [
        {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
        # `on` spelled out: the default list says "overloaded", which the local server
        # reads as "answer 529" anywhere in the first message.
        {"id": "fetch", "type": "action", "retry": {"max_retries": 0, "on": ["server_error"]},
         "config": {"kind": "http_request", "url": "https://api.example.com/items"}},
    ],
    "connections": [{"source": "start", "target": "fetch"}],
}  # fmt: skip


def op(kind: str, **fields: Any) -> dict[str, Any]:
    blank = dict.fromkeys(("node_id", "field", "value_json", "source", "target", "branch"))
    return {**blank, "op": kind, **fields}


RETRY = {
    "kind": "reliability",
    "reason": "fetch fails on 5xx and never retries",
    "evidence": "2 of 4 runs failed with server_error",
    "operations": [
        op("set_node_field", node_id="fetch", field="retry", value_json='{"max_retries": 2}')
    ],
}
WRONG = {
    "kind": "simplify",
    "reason": "remove the unused step",
    "evidence": "it never ran",
    "operations": [op("remove_node", node_id="nope")],
}
LABEL = {
    "kind": "other",
    "reason": "name the step",
    "evidence": "none",
    "operations": [op("set_node_field", node_id="fetch", field="label", value_json='"Fetch"')],
}


async def workflow(
    client: httpx.AsyncClient, session: AsyncSession, team: Workspace, editor: Actor
) -> str:
    r = await client.post(API, headers=editor.headers, json={"name": "Items", **DEFINITION})
    assert r.status_code == 201, r.text
    wf_id: str = r.json()["id"]
    for node in (failed("server_error"), ok(), failed("server_error"), ok()):
        await add_run(session, team.id, uuid.UUID(wf_id), {"start": ok(1), "fetch": node})
    return wf_id


async def test_a_patch_that_does_not_apply_is_fixed_in_a_repair_round_and_stored(
    llm: httpx.AsyncClient,
    session: AsyncSession,
    team: Workspace,
    editor: Actor,
    server: Server,
) -> None:
    wf_id = await workflow(llm, session, team, editor)
    before = len(server[1])
    prompt = "focus on reliability " + script(
        {"suggestions": [RETRY, WRONG]}, {"suggestions": [LABEL]}
    )
    r = await llm.post(
        f"{API}/{wf_id}/suggestions/generate", headers=editor.headers, json={"instruction": prompt}
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["rounds"], out["rejected"]) == (2, [])
    assert [s["kind"] for s in out["items"]] == ["reliability", "other"]
    assert all(s["source"] == "model" and s["status"] == "open" for s in out["items"])
    assert out["items"][0]["evidence"]["summary"] == "2 of 4 runs failed with server_error"
    assert out["items"][0]["patch"] == [
        {"op": "set_node_field", "node_id": "fetch", "field": "retry",
         "value": {"max_retries": 2}},
    ]  # fmt: skip
    assert out["usage"]["input_tokens"] == 10 + 30 and out["cost_usd"] > 0
    sent = server[1][before:]
    assert len(sent) == 2
    first = sent[0]["body"]
    assert first["tool_choice"] == {"type": "tool", "name": "submit_suggestions"}
    assert first["tools"][0]["strict"] is True
    # The model saw the definition and the run-history figures.
    asked = first["messages"][0]["content"]
    assert '"failures_by_class":{"server_error":2}' in asked and "api.example.com" in asked
    assert "Rules the validator enforces" in first["system"]
    assert "submit_workflow" not in first["system"]
    feedback = sent[1]["body"]["messages"][-1]["content"][0]
    assert feedback["is_error"] is True and "no node 'nope'" in feedback["content"]

    # A model suggestion is accepted like any other.
    sid = out["items"][0]["id"]
    accepted = await llm.post(f"{API}/{wf_id}/suggestions/{sid}/accept", headers=editor.headers)
    assert accepted.status_code == 200, accepted.text
    fetch = next(n for n in accepted.json()["workflow"]["nodes"] if n["id"] == "fetch")
    assert fetch["retry"]["max_retries"] == 2
    log = await llm.get(
        f"/api/v1/workspaces/{team.id}/activity",
        headers=editor.headers,
        params={"action": "workflow.suggestions.generate"},
    )
    details = log.json()["items"][0]["details"]
    assert (details["rounds"], len(details["suggestions"])) == (2, 2)


async def test_a_patch_that_stays_invalid_comes_back_rejected(
    llm: httpx.AsyncClient,
    session: AsyncSession,
    team: Workspace,
    editor: Actor,
    server: Server,
) -> None:
    wf_id = await workflow(llm, session, team, editor)
    method = op("set_node_field", node_id="fetch", field="config.method", value_json='"FETCH"')
    bad_value = {**LABEL, "operations": [method]}
    not_json = {**LABEL, "operations": [op("set_setting", field="timeout_s", value_json="{")]}
    nan = {**LABEL, "operations": [op("set_setting", field="timeout_s", value_json="NaN")]}
    nul = {**LABEL, "operations": [op("set_node_field", node_id="fetch", field="label",
                                      value_json='"a\\u0000b"')]}  # fmt: skip
    # A fine one, said with a NUL (PostgreSQL refuses those): stored without it, once.
    fine = {**LABEL, "reason": "name\u0000 the step"}
    before = len(server[1])
    r = await llm.post(
        f"{API}/{wf_id}/suggestions/generate",
        headers=editor.headers,
        json={"instruction": script({"suggestions": [bad_value, not_json, nan, nul, fine]})},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["rounds"] == 3  # 1 + GENERATE__MAX_REPAIR_ROUNDS
    assert [s["reason"] for s in out["items"]] == ["name the step"]
    assert len(server[1]) - before == 3
    problems = [p for rejected in out["rejected"] for p in rejected["problems"]]
    assert {(p["node_id"], p["field"]) for p in problems} == {
        ("fetch", "config.method"), (None, "patch"),
    }  # fmt: skip
    messages = " ".join(p["message"] for p in problems)
    assert "not JSON" in messages and "NaN is not a JSON number" in messages
    assert "NUL" in messages
    listed = await llm.get(f"{API}/{wf_id}/suggestions", headers=editor.headers)
    assert listed.json()["total"] == 1


async def test_spend_limit_is_402_no_key_is_424_and_bad_input_422(
    llm: httpx.AsyncClient,
    client: httpx.AsyncClient,
    session: AsyncSession,
    team: Workspace,
    editor: Actor,
    server: Server,
) -> None:
    wf_id = await workflow(llm, session, team, editor)
    url = f"{API}/{wf_id}/suggestions/generate"
    before = len(server[1])
    r = await llm.post(url, headers=editor.headers, json={"instruction": "spend it"})
    assert (r.status_code, r.json()["error"]) == (402, "quota_exceeded")
    assert len(server[1]) - before == 1  # never retried
    r = await llm.post(url, headers=editor.headers, json={"max_cost_usd": 0})
    assert (r.status_code, r.json()["field"]) == (402, "max_cost_usd")
    for body in ({"instruction": ""}, {"instruction": "x", "extra": 1}, {"max_cost_usd": -1}):
        r = await llm.post(url, headers=editor.headers, json=body)
        assert r.status_code == 422, (body, r.text)
    # The plain test app has no provider key.
    r = await client.post(url, headers=editor.headers, json={})
    assert (r.status_code, r.json()["field"]) == (424, "ANTHROPIC__API_KEY")
    assert len(server[1]) - before == 1
    assert json.loads(r.text)["error"] == "not_configured"
