"""The per-user budget of the tools API (TOOLS__RATE_LIMIT, "100 per hour" by default):
shared by every tool, every workspace and the user's API keys; other users keep their
own; refused input and missing configuration spend none of it."""

from __future__ import annotations

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.permissions import Role
from backend.config import Settings
from backend.models import Workspace
from tests.support.identity import Actor, add_member, make_workspace, member
from tests.tools.conftest import API, ApiFor, api_key_for, configure, usage_rows
from tests.tools.sites import Sites


def test_the_default_budget_is_the_issues_100_an_hour(settings: Settings) -> None:
    assert settings.tools.rate_limit == "100 per hour"


async def test_the_budget_is_per_user_across_tools_workspaces_and_keys(
    api_for: ApiFor,
    local: Settings,
    session: AsyncSession,
    settings: Settings,
    editor: Actor,
    team: Workspace,
    sites: Sites,
) -> None:
    read = {"url": f"{sites.base}/plain"}
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    other = await make_workspace(session, "Other")
    await add_member(session, other, editor.user, Role.EDITOR)
    colleague = await member(session, settings, team, Role.EDITOR)
    key = await api_key_for(session, team, editor.user.id)
    async with api_for(configure(local, rate_limit="3 per hour")) as client:
        for body, path in ((read, "web/read"), (chat, "ai/chat"), (read, "web/read")):
            r = await client.post(f"{API}/{path}", headers=editor.headers, json=body)
            assert r.status_code == 200, r.text
        spent = [
            await client.post(f"{API}/ai/chat", headers=editor.headers, json=chat),
            await client.post(
                f"{API}/web/read",
                headers={**editor.headers, "X-Workspace-ID": str(other.id)},
                json=read,
            ),
            await client.post(
                f"{API}/web/read",
                headers={"X-API-Key": key, "X-Workspace-ID": str(team.id)},
                json=read,
            ),
        ]
        for r in spent:
            assert r.status_code == 429, r.text
            assert r.json()["error"] == "rate_limited"
            assert 1 <= int(r.headers["Retry-After"]) <= 3601
        theirs = await client.post(
            f"{API}/web/read",
            headers={**colleague.headers, "X-Workspace-ID": str(team.id)},
            json=read,
        )
        assert theirs.status_code == 200, theirs.text
    # Refused calls were not made, so not recorded: three by the editor, one by the colleague.
    rows = await usage_rows(session, team)
    assert sorted((r.tool, r.user_id == editor.user.id) for r in rows) == [
        ("ai_chat", True), ("web_read", False), ("web_read", True), ("web_read", True)
    ]  # fmt: skip


async def test_refused_input_and_missing_configuration_spend_nothing(
    api_for: ApiFor, local: Settings, editor: Actor, sites: Sites
) -> None:
    tight = configure(local, rate_limit="2 per hour", search_provider=None, image_url=None)
    async with api_for(tight) as client:
        for _ in range(3):
            assert (
                await client.post(
                    f"{API}/web/read", headers=editor.headers, json={"url": "ftp://x"}
                )
            ).status_code == 422
            assert (
                await client.post(f"{API}/web/search", headers=editor.headers, json={"query": "q"})
            ).status_code == 424
            assert (
                await client.post(f"{API}/ai/image", headers=editor.headers, json={"prompt": "p"})
            ).status_code == 424
        for _ in range(2):
            r = await client.post(
                f"{API}/web/read", headers=editor.headers, json={"url": f"{sites.base}/plain"}
            )
            assert r.status_code == 200, r.text
        r = await client.post(
            f"{API}/web/read", headers=editor.headers, json={"url": f"{sites.base}/plain"}
        )
        assert r.status_code == 429


async def test_tool_routes_are_in_the_openapi_document(api: httpx.AsyncClient) -> None:
    paths = (await api.get("/openapi.json")).json()["paths"]
    for route in ("ai/chat", "web/read", "web/search", "ai/image"):
        operation = paths[f"{API}/{route}"]["post"]
        assert {"401", "403", "422", "429", "503"} <= set(operation["responses"])
    assert "424" in paths[f"{API}/web/search"]["post"]["responses"]
    assert "424" in paths[f"{API}/ai/image"]["post"]["responses"]
    assert "text/event-stream" in paths[f"{API}/ai/chat"]["post"]["responses"]["200"]["content"]


def with_quotas(settings: Settings, **limits: int) -> Settings:
    return settings.model_copy(update={"quotas": settings.quotas.model_copy(update=limits)})


async def test_the_workspace_quotas_apply_to_the_tools_api(
    api_for: ApiFor, local: Settings, editor: Actor, sites: Sites
) -> None:
    read = {"url": f"{sites.base}/plain"}
    async with api_for(with_quotas(local, tool_calls_per_hour=2)) as client:
        for _ in range(2):
            r = await client.post(f"{API}/web/read", headers=editor.headers, json=read)
            assert r.status_code == 200, r.text
        r = await client.post(f"{API}/web/read", headers=editor.headers, json=read)
    assert r.status_code == 402, r.text
    assert (r.json()["error"], r.json()["quota"], r.json()["limit"]) == (
        "quota_exceeded", "tool_calls_per_hour", 2
    )  # fmt: skip


async def test_the_monthly_ai_tokens_quota_stops_chat_but_not_web_reads(
    api_for: ApiFor, local: Settings, editor: Actor, sites: Sites
) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    async with api_for(with_quotas(local, ai_tokens_per_month=5)) as client:
        # A call let in may cross the limit (17 tokens here); the next one is refused.
        first = await client.post(f"{API}/ai/chat", headers=editor.headers, json=chat)
        assert first.status_code == 200, first.text
        for stream in (False, True):
            r = await client.post(
                f"{API}/ai/chat", headers=editor.headers, json={**chat, "stream": stream}
            )
            assert r.status_code == 402, r.text
            assert r.json()["quota"] == "ai_tokens_per_month"
        r = await client.post(
            f"{API}/web/read", headers=editor.headers, json={"url": f"{sites.base}/plain"}
        )
        assert r.status_code == 200, r.text
