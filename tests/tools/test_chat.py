"""POST /tools/ai/chat through the real anthropic SDK against the local Messages-API
server: JSON and SSE answers, tokens and cost recorded, provider failures mapped,
and input refused before anything is spent."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from backend.agents.runtime import price_of
from backend.config import Settings
from backend.models import Workspace
from tests.support.identity import Actor
from tests.tools.conftest import API, ApiFor, Requests, configure, usage_rows

CHAT = f"{API}/ai/chat"


def events(text: str) -> list[tuple[str, Any]]:
    """(event, data) pairs of a text/event-stream body, comments (pings) left out."""
    out = []
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line and not line.startswith(":")]
        if not lines:
            continue
        kind = next(line[7:] for line in lines if line.startswith("event: "))
        data = "\n".join(line[6:] for line in lines if line.startswith("data: "))
        out.append((kind, json.loads(data)))
    return out


async def test_a_chat_answers_with_usage_and_cost_and_is_recorded(
    api: httpx.AsyncClient,
    editor: Actor,
    team: Workspace,
    session: AsyncSession,
    local: Settings,
    anthropic_server: tuple[str, Requests],
) -> None:
    _, requests = anthropic_server
    before = len(requests)
    r = await api.post(
        CHAT,
        headers=editor.headers,
        json={
            "messages": [
                {"role": "user", "content": "  hello there"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]},
                {"role": "user", "content": "and again"},
            ],
            "system": "Be brief.",
            "max_tokens": 100,
            "temperature": 0.3,
            "stop_sequences": ["END"],
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    # The local server echoes the first user turn, exactly as sent (no stripping).
    assert body["text"] == "echo:   hello there"
    assert body["model"] == local.anthropic.default_model
    assert body["stop_reason"] == "end_turn"
    assert body["usage"]["input_tokens"] == 30 and body["usage"]["output_tokens"] == 7
    expected = price_of(local.anthropic.prices, body["model"], _Usage(30, 7))
    assert expected is not None and body["cost_usd"] == pytest.approx(expected)
    sent = requests[before]["body"]
    assert sent["system"] == "Be brief."
    assert (sent["max_tokens"], sent["temperature"], sent["stop_sequences"]) == (100, 0.3, ["END"])
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert "sk-test-local" in str(requests[before]["headers"])
    (row,) = [u for u in await usage_rows(session, team) if u.tool == "ai_chat"]
    assert (row.input_tokens, row.output_tokens, row.ok) == (30, 7, True)
    assert row.user_id == editor.user.id and row.model == body["model"]
    assert row.cost_usd == pytest.approx(expected)


class _Usage:
    def __init__(self, input_tokens: int, output_tokens: int) -> None:
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens


async def test_max_tokens_defaults_to_the_setting(
    api: httpx.AsyncClient, editor: Actor, local: Settings, anthropic_server: tuple[str, Requests]
) -> None:
    _, requests = anthropic_server
    before = len(requests)
    r = await api.post(
        CHAT, headers=editor.headers, json={"messages": [{"role": "user", "content": "x"}]}
    )
    assert r.status_code == 200, r.text
    assert requests[before]["body"]["max_tokens"] == local.tools.chat_max_tokens


async def test_stream_sends_deltas_then_the_result(
    api: httpx.AsyncClient,
    editor: Actor,
    team: Workspace,
    session: AsyncSession,
    anthropic_server: tuple[str, Requests],
) -> None:
    _, requests = anthropic_server
    before = len(requests)
    r = await api.post(
        CHAT,
        headers=editor.headers,
        json={"messages": [{"role": "user", "content": "a long answer please"}], "stream": True},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    got = events(r.text)
    deltas = [d["text"] for kind, d in got if kind == "delta"]
    kinds = [kind for kind, _ in got]
    assert kinds[-1] == "result" and set(kinds[:-1]) == {"delta"}
    result = got[-1][1]
    # Streamed in the provider's small pieces, and they add up to the answer.
    assert len(deltas) > 100
    assert "".join(deltas) == result["text"] and len(result["text"]) == 3000
    assert result["usage"]["output_tokens"] == 7 and result["cost_usd"] is not None
    assert requests[before]["body"]["stream"] is True
    (row,) = [u for u in await usage_rows(session, team) if u.tool == "ai_chat"]
    assert (row.input_tokens, row.output_tokens, row.ok) == (10, 7, True)


async def test_a_provider_failure_mid_stream_is_an_error_event_and_still_recorded(
    api: httpx.AsyncClient, editor: Actor, team: Workspace, session: AsyncSession
) -> None:
    r = await api.post(
        CHAT,
        headers=editor.headers,
        json={"messages": [{"role": "user", "content": "overloaded"}], "stream": True},
    )
    assert r.status_code == 200
    ((kind, data),) = events(r.text)
    assert kind == "error"
    assert (data["status"], data["error"]) == (503, "dependency_unavailable")
    (row,) = [u for u in await usage_rows(session, team) if u.tool == "ai_chat"]
    assert row.ok is False and row.output_tokens == 0


@pytest.mark.parametrize(
    ("prompt", "status", "error"),
    [
        ("overloaded", 503, "dependency_unavailable"),
        ("spend it all", 402, "quota_exceeded"),
        ("ratelimit-once", 429, "rate_limited"),
    ],
)
async def test_provider_failures_have_their_status(
    api: httpx.AsyncClient,
    editor: Actor,
    team: Workspace,
    session: AsyncSession,
    prompt: str,
    status: int,
    error: str,
) -> None:
    r = await api.post(
        CHAT, headers=editor.headers, json={"messages": [{"role": "user", "content": prompt}]}
    )
    assert r.status_code == status, r.text
    assert r.json()["error"] == error
    if status == 429:
        assert int(r.headers["Retry-After"]) >= 1
    (row,) = [u for u in await usage_rows(session, team) if u.tool == "ai_chat"]
    assert row.ok is False


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "system", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "   "}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "model": "a b"}, "model"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": []}, "tools"),
        ({"messages": [{"role": "user", "content": "x" * 200_001}]}, "messages[0].content"),
    ],
)
async def test_bad_input_is_a_422_naming_the_field_and_calls_nothing(
    api: httpx.AsyncClient,
    editor: Actor,
    team: Workspace,
    session: AsyncSession,
    anthropic_server: tuple[str, Requests],
    body: dict[str, Any],
    field: str,
) -> None:
    _, requests = anthropic_server
    before = len(requests)
    for stream in (False, True):
        r = await api.post(CHAT, headers=editor.headers, json={**body, "stream": stream})
        assert r.status_code == 422, r.text
        assert r.json()["error"] == "validation_error"
        fields = [f["field"] for f in r.json().get("fields", [])] or [r.json().get("field")]
        assert any(f == field or f.startswith(field + ".") for f in fields), r.json()
    assert len(requests) == before
    assert await usage_rows(session, team) == []


async def test_without_a_key_it_is_424_naming_the_setting(
    api_for: ApiFor, local: Settings, editor: Actor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    keyless = local.model_copy(
        update={"anthropic": local.anthropic.model_copy(update={"api_key": None})}
    )
    async with api_for(keyless) as client:
        for stream in (False, True):
            r = await client.post(
                CHAT,
                headers=editor.headers,
                json={"messages": [{"role": "user", "content": "hi"}], "stream": stream},
            )
            assert r.status_code == 424, r.text
            assert (r.json()["error"], r.json()["field"]) == (
                "not_configured",
                "ANTHROPIC__API_KEY",
            )


async def test_a_viewer_may_not_spend(
    api: httpx.AsyncClient, session: AsyncSession, settings: Settings, team: Workspace
) -> None:
    from backend.auth.permissions import Role
    from tests.support.identity import member

    viewer = await member(session, settings, team, Role.VIEWER)
    r = await api.post(
        CHAT,
        headers={**viewer.headers, "X-Workspace-ID": str(team.id)},
        json={"messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 403 and r.json()["error"] == "permission_denied"


async def test_the_max_tokens_cap_follows_the_setting(
    api_for: ApiFor, local: Settings, editor: Actor
) -> None:
    async with api_for(configure(local, chat_max_tokens=2000)) as client:
        r = await client.post(
            CHAT,
            headers=editor.headers,
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500},
        )
        assert r.status_code == 200, r.text
