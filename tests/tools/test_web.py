"""POST /tools/web/read and /tools/web/search against local sites and search providers:
markdown, title and links; the SSRF guard on the URL and on every redirect; size,
time and type limits; each provider's answer shape; 424 without a provider."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession

from backend.config import Settings
from backend.models import Workspace
from tests.support.identity import Actor
from tests.tools.conftest import API, ApiFor, configure, usage_rows
from tests.tools.sites import BRAVE_KEY, JINA_KEY, Sites

READ = f"{API}/web/read"
SEARCH = f"{API}/web/search"


async def test_an_article_reads_as_title_markdown_and_links(
    api: httpx.AsyncClient, editor: Actor, team: Workspace, session: AsyncSession, sites: Sites
) -> None:
    r = await api.post(READ, headers=editor.headers, json={"url": f"{sites.base}/article"})
    assert r.status_code == 200, r.text
    page = r.json()
    assert page["title"] == "The Article Title"
    assert (page["status"], page["content_type"]) == (200, "text/html")
    assert page["final_url"] == f"{sites.base}/article" and page["truncated"] is False
    text = page["text"]
    assert "Workflows are graphs of nodes." in text
    # Markdown links, relative ones made absolute.
    assert "guide](https://docs.example.com/agents)" in text
    assert f"[about us]({sites.base}/about)" in text
    assert "- first point" in text
    assert "script text" not in text and "Copyright" not in text  # boilerplate left out
    links = [link["url"] for link in page["links"]]
    # Absolute, without fragments, once each; no javascript: or mailto:.
    assert links == [f"{sites.base}/", f"{sites.base}/about", "https://docs.example.com/agents"]
    assert page["links"][2]["text"] == "the agent guide"
    assert page["bytes"] > 500
    (row,) = await usage_rows(session, team)
    assert (row.tool, row.ok, row.cost_usd, row.user_id) == ("web_read", True, 0.0, editor.user.id)


async def test_text_pages_come_as_sent_and_charsets_are_honoured(
    api: httpx.AsyncClient, editor: Actor, sites: Sites
) -> None:
    plain = (
        await api.post(READ, headers=editor.headers, json={"url": f"{sites.base}/plain"})
    ).json()
    assert plain["text"] == "just text\n  with its spacing kept\n"
    assert plain["content_type"] == "text/plain" and plain["links"] == []
    r = await api.post(READ, headers=editor.headers, json={"url": f"{sites.base}/latin1"})
    assert r.status_code == 200, r.text
    assert r.json()["title"] == "Café" and "Un café crème." in r.json()["text"]


async def test_max_chars_truncates_and_links_can_be_left_out(
    api: httpx.AsyncClient, editor: Actor, sites: Sites
) -> None:
    r = await api.post(
        READ,
        headers=editor.headers,
        json={"url": f"{sites.base}/article", "max_chars": 100, "include_links": False},
    )
    page = r.json()
    assert len(page["text"]) == 100 and page["truncated"] is True and page["links"] == []


async def test_redirects_are_followed_and_each_hop_is_checked(
    api: httpx.AsyncClient, editor: Actor, sites: Sites
) -> None:
    ok = await api.post(
        READ, headers=editor.headers, json={"url": f"{sites.base}/redirect?to=/plain"}
    )
    assert ok.status_code == 200 and ok.json()["final_url"] == f"{sites.base}/plain"
    to_metadata = f"{sites.base}/redirect?to=http://169.254.169.254/latest/meta-data/"
    r = await api.post(READ, headers=editor.headers, json={"url": to_metadata})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "url" and "169.254.169.254" in r.json()["detail"]


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "http://10.0.0.1/",
    ],
)
async def test_private_and_metadata_addresses_are_refused(
    api: httpx.AsyncClient, editor: Actor, url: str
) -> None:
    r = await api.post(READ, headers=editor.headers, json={"url": url})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "url" and "refused" in r.json()["detail"]


async def test_a_host_that_does_not_resolve_is_the_urls_fault(
    api: httpx.AsyncClient, editor: Actor
) -> None:
    r = await api.post(READ, headers=editor.headers, json={"url": "http://no-such-host.invalid/"})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "url" and "does not resolve" in r.json()["detail"]


async def test_loopback_is_refused_unless_an_operator_allows_it(
    api_for: ApiFor, local: Settings, editor: Actor, sites: Sites
) -> None:
    closed = local.model_copy(
        update={"http": local.http.model_copy(update={"allow_private_networks": []})}
    )
    async with api_for(closed) as client:
        r = await client.post(READ, headers=editor.headers, json={"url": f"{sites.base}/article"})
    assert r.status_code == 422 and "127.0.0.1" in r.json()["detail"]


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/x",
        "http://user:pw@example.com/",
        "not a url",
        "http:///x",
    ],
)
async def test_urls_that_are_not_http_pages_are_422(
    api: httpx.AsyncClient, editor: Actor, team: Workspace, session: AsyncSession, url: str
) -> None:
    r = await api.post(READ, headers=editor.headers, json={"url": url})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "url"
    # Refused before the budget or the usage table were touched.
    assert await usage_rows(session, team) == []


@pytest.mark.parametrize(
    ("path", "status", "words"),
    [
        ("/big", 502, "TOOLS__WEB_READ_MAX_BYTES"),
        ("/missing", 502, "answered 404"),
        ("/pdf", 502, "application/pdf"),
        ("/drip", 503, "within 1 s"),
    ],
)
async def test_what_cannot_be_read_says_why(
    api: httpx.AsyncClient,
    editor: Actor,
    team: Workspace,
    session: AsyncSession,
    sites: Sites,
    path: str,
    status: int,
    words: str,
) -> None:
    started = time.monotonic()
    r = await api.post(READ, headers=editor.headers, json={"url": f"{sites.base}{path}"})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    if path == "/missing":
        assert r.json()["upstream_status"] == 404
    # A page that never ends is cut at the total bound (1 s here), not at 60 s.
    assert time.monotonic() - started < 10
    (row,) = await usage_rows(session, team)
    assert row.ok is False


async def test_max_chars_above_the_setting_is_422(
    api: httpx.AsyncClient, editor: Actor, sites: Sites
) -> None:
    r = await api.post(
        READ, headers=editor.headers, json={"url": f"{sites.base}/plain", "max_chars": 60_000}
    )
    assert r.status_code == 422 and r.json()["field"] == "max_chars"
    assert "TOOLS__WEB_READ_MAX_CHARS" in r.json()["detail"]


# Search ----------------------------------------------------------------------------------


async def test_searxng_results(
    api: httpx.AsyncClient, editor: Actor, team: Workspace, session: AsyncSession, sites: Sites
) -> None:
    r = await api.post(
        SEARCH, headers=editor.headers, json={"query": "  durable   runs ", "count": 3}
    )
    assert r.status_code == 200, r.text
    found = r.json()
    assert (found["query"], found["provider"]) == ("durable runs", "searxng")
    # Non-http results are dropped; HTML entities become text.
    assert [h["url"] for h in found["results"]] == [
        f"https://r{i}.example/durable-runs" for i in range(3)
    ]
    assert found["results"][0] == {
        "title": "Result 0 for durable runs",
        "url": "https://r0.example/durable-runs",
        "snippet": "snippet 0 & more",
    }
    (sent,) = sites.seen("/searx/search")[-1:]
    assert sent["query"] == {"q": "durable runs", "format": "json"}
    (row,) = await usage_rows(session, team)
    assert (row.tool, row.model, row.ok) == ("web_search", "searxng", True)


async def test_brave_and_jina_answer_shapes_and_keys(
    api_for: ApiFor, local: Settings, editor: Actor, sites: Sites
) -> None:
    brave = configure(
        local,
        search_provider="brave",
        search_url=f"{sites.base}/brave/search",
        search_api_key=SecretStr(BRAVE_KEY),
    )
    async with api_for(brave) as client:
        r = await client.post(SEARCH, headers=editor.headers, json={"query": "mcp", "count": 2})
    assert r.status_code == 200, r.text
    assert r.json()["results"] == [
        {"title": "mcp 0", "url": "https://b0.example/", "snippet": "about mcp"},
        {"title": "mcp 1", "url": "https://b1.example/", "snippet": "about mcp"},
    ]
    assert sites.seen("/brave/search")[-1]["query"] == {"q": "mcp", "count": "2"}
    wrong = configure(brave, search_api_key=SecretStr("wrong"))
    async with api_for(wrong) as client:
        r = await client.post(SEARCH, headers=editor.headers, json={"query": "mcp"})
    assert r.status_code == 502 and r.json()["field"] == "TOOLS__SEARCH_API_KEY"
    assert "wrong" not in r.text
    jina = configure(
        local,
        search_provider="jina",
        search_url=f"{sites.base}/jina",
        search_api_key=SecretStr(JINA_KEY),
    )
    async with api_for(jina) as client:
        r = await client.post(SEARCH, headers=editor.headers, json={"query": "a/b c?"})
    assert r.status_code == 200, r.text
    assert r.json()["results"] == [
        {"title": "J a/b c?", "url": "https://j.example/1", "snippet": "jina text"}
    ]
    # The query is one path segment, escaped (a "/" or "?" in it cannot change the URL).
    assert sites.seen("/jina/")[-1]["raw_path"] == "/jina/a%2Fb%20c%3F"


@pytest.mark.parametrize(
    ("tools", "field"),
    [
        ({"search_provider": None}, "TOOLS__SEARCH_PROVIDER"),
        ({"search_provider": "searxng", "search_url": None}, "TOOLS__SEARCH_URL"),
        ({"search_provider": "brave", "search_api_key": None}, "TOOLS__SEARCH_API_KEY"),
        ({"search_provider": "searxng", "search_url": "ftp://x/"}, "TOOLS__SEARCH_URL"),
    ],
)
async def test_no_usable_provider_is_424_naming_the_setting(
    api_for: ApiFor,
    local: Settings,
    editor: Actor,
    team: Workspace,
    session: AsyncSession,
    tools: dict[str, Any],
    field: str,
) -> None:
    async with api_for(configure(local, **tools)) as client:
        r = await client.post(SEARCH, headers=editor.headers, json={"query": "anything"})
    assert r.status_code == 424, r.text
    assert (r.json()["error"], r.json()["field"]) == ("not_configured", field)
    assert await usage_rows(session, team) == []


async def test_provider_trouble_is_told_apart(
    api_for: ApiFor, local: Settings, editor: Actor, sites: Sites
) -> None:
    async with api_for(configure(local, search_url=f"{sites.base}/busy/search")) as client:
        r = await client.post(SEARCH, headers=editor.headers, json={"query": "q"})
    assert r.status_code == 429 and r.headers["Retry-After"] == "7"
    async with api_for(configure(local, search_url=f"{sites.base}/broken/search")) as client:
        r = await client.post(SEARCH, headers=editor.headers, json={"query": "q"})
    assert r.status_code == 502 and "not JSON" in r.json()["detail"]
    # The operator's provider URL on a private address is a configuration problem.
    closed = local.model_copy(
        update={"http": local.http.model_copy(update={"allow_private_networks": []})}
    )
    async with api_for(closed) as client:
        r = await client.post(SEARCH, headers=editor.headers, json={"query": "q"})
    assert r.status_code == 424 and r.json()["field"] == "TOOLS__SEARCH_URL"


@pytest.mark.parametrize(
    "body",
    [{"query": "   "}, {"query": ""}, {"query": "q", "count": 0}, {"query": "q", "count": 21}, {}],
)
async def test_bad_search_input_is_422(
    api: httpx.AsyncClient, editor: Actor, body: dict[str, Any]
) -> None:
    r = await api.post(SEARCH, headers=editor.headers, json=body)
    assert r.status_code == 422, r.text
