"""Text to workflow through the real anthropic SDK against the local Messages-API server:
repair rounds, a draft that stays invalid, 429 then success, spend limits, no key, edits
with a diff, streaming, and strict tool input (and its fallback)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.main import create_app
from backend.models import Workspace
from tests.support.asgi import client_for
from tests.support.factories import make_agent, make_credential
from tests.support.fake_anthropic import fake_anthropic, script
from tests.support.identity import Actor

API = "/api/v1/workflows"
Server = tuple[str, list[dict[str, Any]]]


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with fake_anthropic() as s:
        yield s


def configured(settings: Settings, url: str, **generate: Any) -> Settings:
    return settings.model_copy(
        update={
            "anthropic": settings.anthropic.model_copy(
                update={"api_key": SecretStr("sk-test-local"), "base_url": url, "max_retries": 2}
            ),
            "generate": settings.generate.model_copy(update=generate),
        }
    )


@pytest.fixture
async def llm(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], server: Server
) -> AsyncIterator[httpx.AsyncClient]:
    async for c in client_for(create_app(configured(settings, server[0])), sessionmaker):
        yield c


def http(node_id: str, url: str = "https://api.example.com/items", **extra: Any) -> dict[str, Any]:
    return {
        "id": node_id,
        "type": "action",
        "config": {"kind": "http_request", "url": url},
        **extra,
    }


def agent(node_id: str, prompt: str) -> dict[str, Any]:
    return {
        "id": node_id,
        "type": "agent",
        "config": {"model": "claude-sonnet-4-5", "prompt": prompt},
    }


def edge(source: str, target: str, **extra: Any) -> dict[str, Any]:
    return {"source": source, "target": target, **extra}


SUMMARY = "Summarise {{ nodes.fetch.output.body }}"
# A cycle and no trigger; then the cycle fixed (the trigger is added again by repair).
CYCLIC = {
    "name": "Digest",
    "nodes": [http("fetch"), agent("summarise", SUMMARY)],
    "connections": [edge("fetch", "summarise"), edge("summarise", "fetch")],
}
FIXED = {
    "name": "Digest",
    "description": "Fetches items and summarises them",
    "nodes": [http("fetch"), agent("summarise", SUMMARY)],
    "connections": [edge("fetch", "summarise")],
}


def requests_since(server: Server, before: int) -> list[dict[str, Any]]:
    return server[1][before:]


async def test_a_cycle_and_a_missing_trigger_are_fixed_by_a_repair_round_and_saved(
    llm: httpx.AsyncClient, editor: Actor, server: Server
) -> None:
    before = len(server[1])
    r = await llm.post(
        f"{API}/generate",
        headers=editor.headers,
        json={"prompt": "fetch items and summarise them " + script(CYCLIC, FIXED), "save": True},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["valid"], out["rounds"], out["stop_reason"]) == (True, 2, "valid")
    assert out["problems"] == []
    assert any("added a manual trigger 'start'" in x for x in out["repairs"])
    nodes = {n["id"]: n for n in out["definition"]["nodes"]}
    assert nodes["start"]["config"] == {"kind": "manual"}
    assert edge("start", "fetch") in out["definition"]["connections"]
    # Two calls of 10x(messages) input and 7 output tokens each, at Sonnet's price.
    assert out["usage"]["input_tokens"] == 10 + 30
    assert out["usage"]["output_tokens"] == 14
    assert out["cost_usd"] == pytest.approx((40 * 3 + 14 * 15) / 1_000_000)
    sent = requests_since(server, before)
    assert len(sent) == 2
    first = sent[0]["body"]
    assert first["tool_choice"] == {"type": "tool", "name": "submit_workflow"}
    assert first["tools"][0]["strict"] is True
    # The repair round told the model what was wrong and what was already repaired.
    feedback = sent[1]["body"]["messages"][-1]["content"][0]
    assert feedback["type"] == "tool_result" and feedback["is_error"] is True
    assert "cycle" in feedback["content"] and "added a manual trigger" in feedback["content"]
    # Saved as a draft that the API reads back as valid.
    assert out["saved"] is True and out["workflow"]["status"] == "draft"
    got = await llm.get(f"{API}/{out['workflow']['id']}", headers=editor.headers)
    assert got.status_code == 200
    assert {n["id"] for n in got.json()["nodes"]} == {"start", "fetch", "summarise"}
    assert got.json()["name"] == "Digest"
    log = await llm.get(
        f"/api/v1/workspaces/{editor.headers['X-Workspace-ID']}/activity",
        headers=editor.headers,
        params={"action": "workflow.generate"},
    )
    if log.status_code == 200:  # the activity route's shape belongs to its own tests
        details = log.json()["items"][0]["details"]
        assert (details["rounds"], details["input_tokens"]) == (2, 40)


async def test_an_answer_that_stays_invalid_comes_back_with_its_problems_unsaved(
    llm: httpx.AsyncClient, editor: Actor, server: Server
) -> None:
    bad = {
        "name": "Broken",
        "nodes": [
            {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
            agent("summarise", "Summarise {{ nodes.fetch.output.body }}"),
            http("fetch"),
        ],
        "connections": [edge("start", "summarise"), edge("start", "fetch")],
    }
    before = len(server[1])
    r = await llm.post(
        f"{API}/generate", headers=editor.headers, json={"prompt": script(bad), "save": True}
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["valid"], out["saved"], out["workflow"]) == (False, False, None)
    assert (out["rounds"], out["stop_reason"]) == (3, "max_rounds")  # 1 + 2 repair rounds
    assert out["problems"] == [
        {
            "node_id": "summarise",
            "field": "config.prompt",
            "message": "refers to node 'fetch', which does not run before summarise",
        }
    ]
    assert len(requests_since(server, before)) == 3
    listed = await llm.get(API, headers=editor.headers)
    assert listed.json()["total"] == 0


async def test_a_429_is_retried_and_then_succeeds(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], editor: Actor
) -> None:
    # A server of its own: "ratelimit-once" answers 429 once per server.
    with fake_anthropic() as (url, requests):
        async for c in client_for(create_app(configured(settings, url)), sessionmaker):
            r = await c.post(
                f"{API}/generate",
                headers=editor.headers,
                json={"prompt": "ratelimit-once " + script(FIXED)},
            )
    assert r.status_code == 200, r.text
    assert r.json()["valid"] is True
    assert len(requests) == 2  # the 429, then the answer


async def test_a_spend_limit_is_402_and_not_retried(
    llm: httpx.AsyncClient, editor: Actor, server: Server
) -> None:
    before = len(server[1])
    r = await llm.post(f"{API}/generate", headers=editor.headers, json={"prompt": "spend it all"})
    assert r.status_code == 402, r.text
    assert r.json()["error"] == "quota_exceeded"
    assert "spend limit" in r.json()["detail"]
    assert len(requests_since(server, before)) == 1
    r = await llm.post(
        f"{API}/generate", headers=editor.headers, json={"prompt": "x", "max_cost_usd": 0}
    )
    assert (r.status_code, r.json()["field"]) == (402, "max_cost_usd")
    assert len(requests_since(server, before)) == 1


async def test_the_spend_cap_stops_further_rounds(
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    editor: Actor,
    server: Server,
) -> None:
    capped = configured(settings, server[0], max_cost_usd=0.0001)
    before = len(server[1])
    async for c in client_for(create_app(capped), sessionmaker):
        r = await c.post(f"{API}/generate", headers=editor.headers, json={"prompt": script(CYCLIC)})
    out = r.json()
    # One answer cost 0.000135 USD, over the cap: no repair round was started.
    assert (r.status_code, out["stop_reason"], out["rounds"], out["valid"]) == (
        200,
        "budget",
        1,
        False,
    )
    assert len(requests_since(server, before)) == 1


async def test_no_key_is_424(
    client: httpx.AsyncClient, editor: Actor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    for stream in (False, True):
        r = await client.post(
            f"{API}/generate", headers=editor.headers, json={"prompt": "hi", "stream": stream}
        )
        assert r.status_code == 424, r.text
        assert (r.json()["error"], r.json()["field"]) == ("not_configured", "ANTHROPIC__API_KEY")


async def test_bad_input_names_its_field(
    llm: httpx.AsyncClient, session: AsyncSession, editor: Actor
) -> None:
    from tests.support.identity import make_workspace

    elsewhere = await make_workspace(session, "Other")
    foreign = await make_agent(session, elsewhere)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "constraints": {"node_types": ["rocket"]}}, "constraints.node_types"),
        ({"prompt": "x", "agent_ids": [str(foreign.id)]}, "agent_ids"),
        ({"prompt": "x", "constraints": {"max_nodes": 1}}, "constraints.max_nodes"),
        ({"prompt": "x", "surprise": 1}, "surprise"),
    ]
    for body, field in cases:
        r = await llm.post(f"{API}/generate", headers=editor.headers, json=body)
        assert r.status_code == 422, (body, r.text)
        fields = [r.json().get("field")] + [f["field"] for f in r.json().get("fields", [])]
        assert field in fields, (body, r.json())


async def test_context_names_agents_and_credentials_never_secrets(
    llm: httpx.AsyncClient, session: AsyncSession, team: Workspace, editor: Actor, server: Server
) -> None:
    helper = await make_agent(session, team, name="Researcher", description="Finds sources")
    cred = await make_credential(session, team, name="crm-token")
    answer = {
        "name": "Research",
        "nodes": [
            {"id": "start", "type": "trigger", "config": {"kind": "webhook"}},
            {"id": "ask", "type": "agent", "config": {"agent_id": str(helper.id), "prompt": "go"}},
            {"id": "push", "type": "action", "config": {
                "kind": "http_request", "url": "https://crm.example.com", "method": "POST",
                "credential_id": str(cred.id), "headers": [{"key": "X-Source", "value": "studio"}],
            }},
        ],
        "connections": [edge("start", "ask"), edge("ask", "push")],
    }  # fmt: skip
    before = len(server[1])
    r = await llm.post(
        f"{API}/generate",
        headers=editor.headers,
        json={"prompt": script(answer), "constraints": {"node_types": ["agent", "action"]}},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["valid"] is True, out["problems"]
    push = next(n for n in out["definition"]["nodes"] if n["id"] == "push")
    # Map entries (the strict spelling) came back as the validator's map.
    assert push["config"]["headers"] == {"X-Source": "studio"}
    system = requests_since(server, before)[0]["body"]["system"]
    assert f"{helper.id}: Researcher - Finds sources" in system
    assert f"{cred.id}: crm-token (bearer)" in system
    assert "Use only these node types: action, agent, trigger." in system
    assert "factory-token" not in json.dumps(requests_since(server, before))


async def test_constraints_are_problems_the_model_must_fix(
    llm: httpx.AsyncClient, editor: Actor
) -> None:
    r = await llm.post(
        f"{API}/generate",
        headers=editor.headers,
        json={"prompt": script(FIXED), "constraints": {"node_types": ["action"], "max_nodes": 2}},
    )
    out = r.json()
    assert out["valid"] is False
    messages = [p["message"] for p in out["problems"]]
    assert any("node type 'agent' is not allowed" in m for m in messages)
    assert any("3 nodes; at most 2" in m for m in messages)


async def new_workflow(client: httpx.AsyncClient, actor: Actor) -> dict[str, Any]:
    r = await client.post(
        API,
        headers=actor.headers,
        json={
            "name": "Fetcher",
            "nodes": [
                {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
                http("fetch") | {"position": {"x": 10, "y": 20}},
            ],
            "connections": [edge("start", "fetch")],
        },
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


EDITED = {
    "name": "Fetcher",
    "nodes": [
        {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
        http("fetch")
        | {"retry": {"max_retries": 5, "backoff_s": [1, 5]}, "continue_on_error": True},
        {
            "id": "alert",
            "type": "action",
            "config": {
                "kind": "notify",
                "channel": "email",
                "to": "ops@example.com",
                "message": "fetch failed",
            },
        },
    ],
    "connections": [edge("start", "fetch"), edge("fetch", "alert", branch="error")],
}


async def test_an_edit_answers_the_diff_and_saves_a_new_version(
    llm: httpx.AsyncClient, editor: Actor, server: Server
) -> None:
    wf = await new_workflow(llm, editor)
    before = len(server[1])
    r = await llm.post(
        f"{API}/{wf['id']}/generate",
        headers=editor.headers,
        json={
            "instruction": "add a retry to fetch, send a mail when it fails " + script(EDITED),
            "save": True,
            "version": 1,
        },
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["valid"] is True and out["saved"] is True
    assert out["base_version"] == 1 and out["workflow"]["version"] == 2
    assert out["diff"] == {
        "nodes_added": ["alert"],
        "nodes_removed": [],
        "nodes_changed": [{"id": "fetch", "fields": ["continue_on_error", "retry"]}],
        "connections_added": [{"source": "fetch", "target": "alert", "branch": "error"}],
        "connections_removed": [],
        "settings_changed": False,
    }
    fetch = next(n for n in out["workflow"]["nodes"] if n["id"] == "fetch")
    assert fetch["position"] == {"x": 10, "y": 20}  # kept though the model never saw it
    # The model was shown the current definition.
    assert '"id":"fetch"' in requests_since(server, before)[0]["body"]["messages"][0]["content"]


async def test_an_edit_of_a_stale_version_is_not_saved(
    llm: httpx.AsyncClient, editor: Actor
) -> None:
    wf = await new_workflow(llm, editor)
    moved = await llm.put(
        f"{API}/{wf['id']}", headers=editor.headers, json={"settings": {"timeout_s": 60}}
    )
    assert moved.json()["version"] == 2
    r = await llm.post(
        f"{API}/{wf['id']}/generate",
        headers=editor.headers,
        json={"instruction": script(EDITED), "save": True, "version": 1},
    )
    assert r.status_code == 409, r.text
    assert r.json()["current_version"] == 2
    r = await llm.post(
        f"{API}/{wf['id']}/generate",
        headers=editor.headers,
        json={"instruction": script(EDITED), "version": 9},
    )
    assert (r.status_code, r.json()["field"]) == (422, "version")


def parse_sse(text: str) -> list[tuple[str, Any]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if "event" in lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


async def test_streaming_sends_progress_each_rounds_problems_and_the_result(
    llm: httpx.AsyncClient, editor: Actor
) -> None:
    async with llm.stream(
        "POST",
        f"{API}/generate",
        headers=editor.headers,
        json={"prompt": script(CYCLIC, FIXED), "stream": True, "save": True},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join([chunk async for chunk in r.aiter_text()])
    events = parse_sse(text)
    kinds = [k for k, _ in events]
    assert kinds[0] == "round" and kinds[-1] == "result"
    assert kinds.count("round") == 2 and kinds.count("problems") == 2
    assert "progress" in kinds
    progress = "".join(d["text"] for k, d in events if k == "progress" and d["round"] == 1)
    assert json.loads(progress)["name"] == "Digest"  # the tool input, as it was written
    problems = [d for k, d in events if k == "problems"]
    assert "cycle" in problems[0]["problems"][0]["message"] and problems[1]["problems"] == []
    result = events[-1][1]
    assert result["valid"] is True and result["saved"] is True
    got = await llm.get(f"{API}/{result['workflow']['id']}", headers=editor.headers)
    assert got.status_code == 200


async def test_a_stream_reports_a_provider_failure_as_an_error_event(
    llm: httpx.AsyncClient, editor: Actor
) -> None:
    r = await llm.post(
        f"{API}/generate", headers=editor.headers, json={"prompt": "spend", "stream": True}
    )
    events = parse_sse(r.text)
    assert events[-1][0] == "error"
    assert (events[-1][1]["status"], events[-1][1]["error"]) == (402, "quota_exceeded")


async def test_without_strict_tool_input_the_plain_schema_is_used(
    llm: httpx.AsyncClient, editor: Actor, server: Server
) -> None:
    before = len(server[1])
    r = await llm.post(
        f"{API}/generate", headers=editor.headers, json={"prompt": "no-strict " + script(FIXED)}
    )
    assert r.status_code == 200, r.text
    assert r.json()["valid"] is True
    sent = [x["body"]["tools"][0] for x in requests_since(server, before)]
    assert [t.get("strict") for t in sent] == [True, None]
    # The plain schema keeps maps as maps.
    plain = json.dumps(sent[1]["input_schema"])
    assert '"additionalProperties": {"type": "string"}' in plain


async def test_viewers_cannot_generate(
    llm: httpx.AsyncClient, session: AsyncSession, settings: Settings, team: Workspace
) -> None:
    from backend.auth.permissions import Role
    from tests.support.identity import member

    viewer = await member(session, settings, team, Role.VIEWER)
    viewer.headers["X-Workspace-ID"] = str(team.id)
    r = await llm.post(f"{API}/generate", headers=viewer.headers, json={"prompt": "x"})
    assert r.status_code == 403
