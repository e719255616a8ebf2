"""Agents: CRUD, sub-agent rules, and a test turn through the real anthropic SDK against
a local server that speaks the Messages API."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.permissions import Role
from backend.config import Settings
from backend.main import create_app
from backend.models import Workspace
from tests.support.asgi import client_for
from tests.support.fake_anthropic import fake_anthropic
from tests.support.identity import Actor, member

API = "/api/v1/agents"


@pytest.fixture(scope="module")
def anthropic_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    with fake_anthropic() as server:
        yield server


@pytest.fixture
async def llm_client(
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    anthropic_server: tuple[str, list[dict[str, Any]]],
) -> AsyncIterator[httpx.AsyncClient]:
    url, _ = anthropic_server
    configured = settings.model_copy(
        update={
            "anthropic": settings.anthropic.model_copy(
                update={"api_key": SecretStr("sk-test-local"), "base_url": url, "max_retries": 0}
            )
        }
    )
    async for c in client_for(create_app(configured), sessionmaker):
        yield c


async def new_agent(client: httpx.AsyncClient, actor: Actor, **fields: Any) -> dict[str, Any]:
    r = await client.post(API, headers=actor.headers, json={"name": "Researcher", **fields})
    assert r.status_code == 201, r.text
    return dict(r.json())


async def test_crud_and_defaults(
    client: httpx.AsyncClient, settings: Settings, editor: Actor
) -> None:
    agent = await new_agent(
        client,
        editor,
        system_prompt="Be brief.",
        tools=[{"type": "builtin", "name": "current_time"}],
        metadata={"team": "ops"},
    )
    assert agent["model"] == settings.anthropic.default_model
    assert agent["metadata"] == {"team": "ops"}
    r = await client.patch(
        f"{API}/{agent['id']}", headers=editor.headers, json={"temperature": 0.2, "max_tokens": 300}
    )
    assert (r.json()["temperature"], r.json()["max_tokens"]) == (0.2, 300)
    listed = (await client.get(API, headers=editor.headers, params={"q": "search"})).json()
    assert listed["total"] == 1
    assert (
        await client.post(
            API,
            headers=editor.headers,
            json={"name": "x", "tools": [{"type": "builtin", "name": "rm_rf"}]},
        )
    ).status_code == 422
    assert (
        await client.post(API, headers=editor.headers, json={"name": "x", "temperature": 3})
    ).status_code == 422
    assert (await client.delete(f"{API}/{agent['id']}", headers=editor.headers)).status_code == 204


async def test_sub_agents_must_exist_here_and_never_form_a_cycle(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, editor: Actor
) -> None:
    import uuid

    a = await new_agent(client, editor, name="A")
    b = await new_agent(client, editor, name="B", sub_agents=[a["id"]])
    r = await client.patch(
        f"{API}/{a['id']}", headers=editor.headers, json={"sub_agents": [b["id"]]}
    )
    assert (r.status_code, r.json()["field"]) == (422, "sub_agents")
    r = await client.post(
        API, headers=editor.headers, json={"name": "C", "sub_agents": [str(uuid.uuid4())]}
    )
    assert r.status_code == 422
    r = await client.delete(f"{API}/{a['id']}", headers=editor.headers)
    assert (r.status_code, r.json()["agents"]) == (409, ["B"])


async def test_without_an_api_key_the_test_says_which_setting_is_missing(
    client: httpx.AsyncClient, editor: Actor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    agent = await new_agent(client, editor)
    r = await client.post(
        f"{API}/{agent['id']}/test", headers=editor.headers, json={"input": "hello"}
    )
    assert r.status_code == 424
    assert (r.json()["error"], r.json()["field"]) == ("not_configured", "ANTHROPIC__API_KEY")


async def test_a_plain_turn(
    llm_client: httpx.AsyncClient, editor: Actor, anthropic_server: tuple[str, list[dict[str, Any]]]
) -> None:
    _, requests = anthropic_server
    agent = await new_agent(
        llm_client, editor, system_prompt="You are terse.", temperature=0.1, max_tokens=200
    )
    before = len(requests)
    r = await llm_client.post(
        f"{API}/{agent['id']}/test", headers=editor.headers, json={"input": "hello there"}
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["output"] == "echo: hello there"
    assert (out["stop_reason"], out["iterations"], out["tool_calls"]) == ("end_turn", 1, [])
    assert out["usage"]["input_tokens"] == 10
    assert out["usage"]["output_tokens"] == 7
    assert out["cost_usd"] == pytest.approx((10 * 3 + 7 * 15) / 1_000_000)
    sent = requests[before]
    assert sent["body"]["system"] == "You are terse."
    assert sent["body"]["temperature"] == 0.1
    assert sent["body"]["max_tokens"] == 200
    # The key went out the way this SDK sends it (x-api-key or a bearer header).
    auth = sent["headers"].get("x-api-key") or sent["headers"].get(
        "authorization", ""
    ).removeprefix("Bearer ")
    assert auth == "sk-test-local"


async def test_a_tool_use_turn_is_traced_and_counted(
    llm_client: httpx.AsyncClient, editor: Actor, anthropic_server: tuple[str, list[dict[str, Any]]]
) -> None:
    _, requests = anthropic_server
    agent = await new_agent(llm_client, editor, tools=[{"type": "builtin", "name": "current_time"}])
    before = len(requests)
    r = await llm_client.post(
        f"{API}/{agent['id']}/test",
        headers=editor.headers,
        json={"input": "please use current_time"},
    )
    out = r.json()
    assert r.status_code == 200, r.text
    assert out["iterations"] == 2
    [call] = out["tool_calls"]
    assert (call["name"], call["input"], call["error"]) == (
        "current_time",
        {"timezone": "Europe/Paris"},
        None,
    )
    assert call["output"]["timezone"] == "Europe/Paris"
    assert out["output"].startswith("The tool said: ")
    assert "Europe/Paris" in out["output"]
    # Both calls' tokens are in the total.
    assert out["usage"]["input_tokens"] == 10 + 30
    assert out["usage"]["output_tokens"] == 14
    # The tool's schema reached the model intact.
    tool = requests[before]["body"]["tools"][0]
    assert tool["input_schema"]["properties"]["timezone"]["type"] == "string"


async def test_sub_agents_run_as_tools_and_their_tokens_count(
    llm_client: httpx.AsyncClient, editor: Actor
) -> None:
    helper = await new_agent(llm_client, editor, name="Greeter", description="Says hi")
    boss = await new_agent(llm_client, editor, name="Boss", sub_agents=[helper["id"]])
    tool = f"agent_Greeter_{helper['id'].replace('-', '')[:6]}"
    r = await llm_client.post(
        f"{API}/{boss['id']}/test", headers=editor.headers, json={"input": f"use {tool}"}
    )
    out = r.json()
    assert r.status_code == 200, r.text
    [call] = out["tool_calls"]
    assert call["name"] == tool
    assert call["output"] == {"output": "echo: say hi", "stop_reason": "end_turn"}
    # Boss: 10 + 30 input tokens; Greeter: 10.
    assert out["usage"]["input_tokens"] == 50


async def test_the_iteration_cap_ends_the_turn_clearly(
    llm_client: httpx.AsyncClient, editor: Actor
) -> None:
    agent = await new_agent(llm_client, editor, tools=[{"type": "builtin", "name": "current_time"}])
    r = await llm_client.post(
        f"{API}/{agent['id']}/test",
        headers=editor.headers,
        json={"input": "loop forever", "max_iterations": 3},
    )
    out = r.json()
    assert (out["stop_reason"], out["iterations"], len(out["tool_calls"])) == (
        "max_iterations",
        3,
        3,
    )


async def test_an_overloaded_provider_is_a_clear_503(
    llm_client: httpx.AsyncClient, editor: Actor
) -> None:
    agent = await new_agent(llm_client, editor)
    r = await llm_client.post(
        f"{API}/{agent['id']}/test", headers=editor.headers, json={"input": "overloaded"}
    )
    assert r.status_code == 503
    assert r.json()["error"] == "dependency_unavailable"


async def test_null_clears_only_what_may_be_empty(client: httpx.AsyncClient, editor: Actor) -> None:
    agent = await new_agent(client, editor, temperature=0.5)
    r = await client.patch(
        f"{API}/{agent['id']}", headers=editor.headers, json={"temperature": None}
    )
    assert (r.status_code, r.json()["temperature"]) == (200, None)
    r = await client.patch(
        f"{API}/{agent['id']}", headers=editor.headers, json={"description": None}
    )
    assert (r.status_code, r.json()["field"]) == (422, "description")


async def test_a_run_has_one_budget_of_model_calls(
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    anthropic_server: tuple[str, list[dict[str, Any]]],
    editor: Actor,
) -> None:
    url, _ = anthropic_server
    capped = settings.model_copy(
        update={
            "anthropic": settings.anthropic.model_copy(
                update={
                    "api_key": SecretStr("k"),
                    "base_url": url,
                    "max_retries": 0,
                    "max_calls_per_run": 2,
                }
            )
        }
    )
    async for c in client_for(create_app(capped), sessionmaker):
        agent = await new_agent(c, editor, tools=[{"type": "builtin", "name": "current_time"}])
        r = await c.post(
            f"{API}/{agent['id']}/test",
            headers=editor.headers,
            json={"input": "loop forever", "max_iterations": 10},
        )
        assert (r.status_code, r.json()["error"]) == (402, "quota_exceeded")


async def test_viewers_cannot_run_an_agent(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    team: Workspace,
    editor: Actor,
) -> None:
    agent = await new_agent(client, editor)
    viewer = await member(session, settings, team, Role.VIEWER)
    assert (await client.get(f"{API}/{agent['id']}", headers=viewer.headers)).status_code == 200
    assert (
        await client.post(f"{API}/{agent['id']}/test", headers=viewer.headers, json={"input": "hi"})
    ).status_code == 403
