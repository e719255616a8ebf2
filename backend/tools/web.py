"""Web read (a URL to its title, main text as markdown and links) and web search (a
pluggable HTTP search provider), shared by the tools API and by agents' built-in
`web_read` / `web_search` tools.

Every request goes through the SSRF guard (backend/kit/http_guard: the address is
checked after DNS and on every redirect), bounded in bytes and in total time — an
httpx timeout bounds each read, not a server that drips a byte a second. Extraction
runs in a thread: parsing a 2 MB page inside the event loop would stall every other
request of the process, and work inside the loop cannot be timed out.

Failures are domain errors (so the API answers them with their status); an agent sees
the same text as a tool error.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urldefrag, urljoin

import httpx

# lxml ships no type information (lxml-stubs is a separate, partial package).
from lxml import etree  # type: ignore[import-untyped]
from lxml import html as lxml_html

from backend.agents.runtime import Tool
from backend.config import Settings
from backend.kit.errors import (
    DependencyUnavailable,
    DomainError,
    NotConfigured,
    RateLimited,
    UpstreamError,
    ValidationFailed,
)
from backend.kit.http_guard import (
    BlockedAddress,
    ResponseTooLarge,
    TooManyRedirects,
    Unresolvable,
    fetch,
)
from backend.kit.lazy import lazy_module

if TYPE_CHECKING:
    import trafilatura
else:
    # Imported on first use: see backend/kit/lazy.py.
    trafilatura = lazy_module("trafilatura")

ACCEPT = (
    "text/html,application/xhtml+xml;q=0.9,text/markdown;q=0.9,text/plain;q=0.8,"
    "application/json;q=0.7,*/*;q=0.1"
)
HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
TEXT_TYPES = frozenset(
    {"text/plain", "text/markdown", "text/x-markdown", "text/csv", "application/json"}
)
MAX_LINKS = 200
MAX_LINK_TEXT = 200
SEARCH_MAX_BYTES = 2 * 1024 * 1024
MAX_SNIPPET = 1000
# What an agent gets by default: a page's worth of context, not a book (every later
# model call of the run carries the tool result again).
AGENT_READ_CHARS = 20_000
AGENT_LINKS = 50

DEFAULT_SEARCH_URLS = {
    "brave": "https://api.search.brave.com/res/v1/web/search",
    "jina": "https://s.jina.ai",
}


def check_url(value: str, field: str = "url") -> httpx.URL:
    """An absolute http(s) URL with a host and no credentials in it."""
    try:
        url = httpx.URL(value.strip())
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise ValidationFailed(f"not a URL: {exc}", field=field) from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValidationFailed("the URL must be http(s) with a host", field=field)
    if url.userinfo:
        raise ValidationFailed("the URL must not carry a user name or password", field=field)
    return url


async def guarded_get(
    http: httpx.AsyncClient,
    settings: Settings,
    request: httpx.Request,
    *,
    what: str,
    timeout_s: float,
    max_bytes: int,
    too_large: str,
    secret_headers: frozenset[str] = frozenset(),
    setting: str | None = None,
) -> tuple[httpx.Response, bytes]:
    """One guarded exchange, its failures as domain errors naming `what` failed. With
    `setting`, the URL is the operator's (a provider's), so a refused address is a
    configuration problem (424), not the caller's input (422)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await fetch(
                http,
                request,
                max_redirects=settings.http.max_redirects,
                max_bytes=max_bytes,
                secret_headers=secret_headers,
            )
    except (TimeoutError, httpx.TimeoutException):
        raise DependencyUnavailable(f"{what} did not answer within {timeout_s:g} s") from None
    except BlockedAddress as exc:
        if setting is not None:
            raise NotConfigured(
                f"{setting} is refused by the SSRF guard ({exc}); allow it with "
                "HTTP__ALLOW_PRIVATE_NETWORKS",
                field=setting,
            ) from None
        raise ValidationFailed(f"refused: {exc}", field="url") from None
    except ResponseTooLarge:
        raise UpstreamError(f"{what} sent more than {max_bytes} bytes ({too_large})") from None
    except TooManyRedirects as exc:
        raise UpstreamError(f"{what}: {exc}") from None
    except Unresolvable as exc:
        if setting is not None:
            raise DependencyUnavailable(f"{what} does not resolve: {exc}") from None
        # A name that does not exist is the URL's fault, like a malformed one.
        raise ValidationFailed(
            f"{request.url.host} (or a host it redirects to) does not resolve", field="url"
        ) from None
    except (httpx.HTTPError, OSError) as exc:
        raise DependencyUnavailable(
            f"{what} could not be reached: {type(exc).__name__}: {exc}"
        ) from None


def _media_type(response: httpx.Response) -> str:
    return str(response.headers.get("content-type", "")).split(";")[0].strip().lower()


def _decode(body: bytes, charset: str | None) -> str:
    try:
        return body.decode(charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return body.decode("utf-8", errors="replace")


def _squash(text: Any) -> str:
    return " ".join(str(text).split())


def _extract_html(
    body: bytes, charset: str | None, base_url: str, want_links: bool
) -> tuple[str, str, list[dict[str, str]]]:
    """(title, markdown, links) of an HTML page."""
    parser = lxml_html.HTMLParser(encoding=charset) if charset else None
    try:
        doc = lxml_html.document_fromstring(body, parser=parser)
    except (etree.ParserError, ValueError, LookupError):
        # Empty or undecodable as declared: try again as UTF-8 text.
        try:
            doc = lxml_html.document_fromstring(_decode(body, "utf-8") or "<html></html>")
        except (etree.ParserError, ValueError):
            return "", "", []
    title_el = doc.find(".//title")
    title = _squash(title_el.text_content()) if title_el is not None else ""
    links: list[dict[str, str]] = []
    if want_links:
        seen: set[str] = set()
        for anchor in doc.iterfind(".//a[@href]"):
            href = (anchor.get("href") or "").strip()
            try:
                absolute = urldefrag(urljoin(base_url, href)).url
            except ValueError:
                continue
            if not absolute.startswith(("http://", "https://")) or absolute in seen:
                continue
            seen.add(absolute)
            links.append({"url": absolute, "text": _squash(anchor.text_content())[:MAX_LINK_TEXT]})
            if len(links) >= MAX_LINKS:
                break
    markdown = trafilatura.extract(
        doc,
        url=base_url,
        output_format="markdown",
        include_links=True,
        include_formatting=True,
        include_tables=True,
        include_comments=False,
        favor_recall=True,
    )
    if not markdown:
        # No main text found (a list page, an app shell): the page's visible text.
        body_el = doc.find(".//body")
        for junk in (body_el if body_el is not None else doc).iterfind(".//script"):
            junk.drop_tree()
        markdown = _squash((body_el if body_el is not None else doc).text_content())
    if not title:
        meta = trafilatura.extract_metadata(doc)
        title = (meta.title or "") if meta is not None else ""
    return title[:1000], markdown, links


async def read(
    http: httpx.AsyncClient,
    settings: Settings,
    url: str,
    *,
    max_chars: int | None = None,
    include_links: bool = True,
    max_links: int = MAX_LINKS,
) -> dict[str, Any]:
    """Fetch a page and return {url, final_url, status, content_type, title, text,
    truncated, links, bytes, duration_ms}."""
    conf = settings.tools
    limit = min(max_chars or conf.web_read_max_chars, conf.web_read_max_chars)
    target = check_url(url)
    started = time.perf_counter()
    request = http.build_request(
        "GET", target, headers={"Accept": ACCEPT}, timeout=conf.web_read_timeout_s
    )
    response, body = await guarded_get(
        http,
        settings,
        request,
        what=target.host,
        timeout_s=conf.web_read_timeout_s,
        max_bytes=conf.web_read_max_bytes,
        too_large="TOOLS__WEB_READ_MAX_BYTES",
    )
    final_url = str(response.request.url)
    if not response.is_success:
        raise UpstreamError(
            f"{response.request.url.host} answered {response.status_code}",
            field="url",
            upstream_status=response.status_code,
        )
    media = _media_type(response)
    charset = response.charset_encoding
    if not media:
        media = "text/html" if body.lstrip()[:1] == b"<" else "text/plain"
    if media in HTML_TYPES:
        try:
            title, text, links = await asyncio.wait_for(
                asyncio.to_thread(_extract_html, body, charset, final_url, include_links),
                timeout=conf.web_read_timeout_s,
            )
        except TimeoutError:
            raise UpstreamError(
                f"the page could not be read within {conf.web_read_timeout_s:g} s"
            ) from None
    elif media in TEXT_TYPES or media.startswith("text/"):
        title, text, links = "", _decode(body, charset), []
    else:
        raise UpstreamError(
            f"{media} is not a page that can be read as text (HTML, plain text, markdown, "
            "JSON or CSV)",
            field="url",
            content_type=media,
        )
    return {
        "url": str(target),
        "final_url": final_url,
        "status": response.status_code,
        "content_type": media,
        "title": title,
        "text": text[:limit],
        "truncated": len(text) > limit,
        "links": links[:max_links],
        "bytes": len(body),
        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
    }


# Search ---------------------------------------------------------------------------------

_TAGS = re.compile(r"<[^>]{0,200}>")


def _plain(value: Any, limit: int) -> str:
    """Provider text without the highlighting markup some put in it (<strong>)."""
    if not isinstance(value, str):
        return ""
    return _squash(html.unescape(_TAGS.sub("", value)))[:limit]


def search_provider(settings: Settings) -> tuple[str, httpx.URL, str | None]:
    """(provider, base URL, key) of the configured search provider; 424 naming the
    missing setting when there is none or it is incomplete."""
    conf = settings.tools
    provider = conf.search_provider
    if provider is None:
        raise NotConfigured(
            "web search is not configured: set TOOLS__SEARCH_PROVIDER (searxng, brave or "
            "jina) and TOOLS__SEARCH_URL / TOOLS__SEARCH_API_KEY",
            field="TOOLS__SEARCH_PROVIDER",
        )
    key = conf.search_api_key.get_secret_value() if conf.search_api_key else None
    base = conf.search_url or DEFAULT_SEARCH_URLS.get(provider)
    if not base:
        raise NotConfigured(
            f"web search with {provider} needs TOOLS__SEARCH_URL", field="TOOLS__SEARCH_URL"
        )
    if provider == "brave" and not key:
        raise NotConfigured(
            "web search with brave needs TOOLS__SEARCH_API_KEY", field="TOOLS__SEARCH_API_KEY"
        )
    try:
        url = check_url(base, field="TOOLS__SEARCH_URL")
    except ValidationFailed as exc:
        raise NotConfigured(
            f"TOOLS__SEARCH_URL is unusable: {exc.detail}", field="TOOLS__SEARCH_URL"
        ) from None
    return provider, url, key


def search_request(
    http: httpx.AsyncClient, settings: Settings, query: str, count: int
) -> tuple[str, httpx.Request]:
    """The provider's name and the request that asks it."""
    provider, url, key = search_provider(settings)
    headers = {"Accept": "application/json"}
    if provider == "searxng":
        url = url.copy_merge_params({"q": query, "format": "json"})
        if key:
            headers["Authorization"] = f"Bearer {key}"
    elif provider == "brave":
        url = url.copy_merge_params({"q": query, "count": count})
        headers["X-Subscription-Token"] = key or ""
    else:  # jina: the query is the path
        url = url.copy_with(path=url.path.rstrip("/") + "/" + quote(query, safe=""))
        if key:
            headers["Authorization"] = f"Bearer {key}"
    timeout = settings.tools.search_timeout_s
    request = http.build_request("GET", url, headers=headers, timeout=timeout)
    return provider, request


def parse_hits(provider: str, data: Any, count: int) -> list[dict[str, str]]:
    if provider == "searxng":
        items = data.get("results") if isinstance(data, dict) else None
        snippet_keys: tuple[str, ...] = ("content",)
    elif provider == "brave":
        web = data.get("web") if isinstance(data, dict) else None
        items = web.get("results") if isinstance(web, dict) else None
        snippet_keys = ("description",)
    else:
        items = data.get("data") if isinstance(data, dict) else None
        snippet_keys = ("description", "content")
    if not isinstance(items, list):
        raise UpstreamError(f"the search provider ({provider}) answered without a result list")
    hits: list[dict[str, str]] = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("url"), str):
            continue
        if not item["url"].startswith(("http://", "https://")):
            continue
        snippet = next((item[k] for k in snippet_keys if isinstance(item.get(k), str)), "")
        hits.append(
            {
                "title": _plain(item.get("title"), 500),
                "url": item["url"][:2000],
                "snippet": _plain(snippet, MAX_SNIPPET),
            }
        )
        if len(hits) >= count:
            break
    return hits


def _retry_after(response: httpx.Response, default: int = 30) -> int:
    try:
        seconds = float(response.headers.get("retry-after", default))
    except ValueError:
        return default
    return int(min(max(seconds, 1), 3600)) if seconds == seconds else default


def provider_failure(response: httpx.Response, what: str, key_setting: str) -> DomainError:
    """The domain error a provider's non-2xx answer becomes."""
    status = response.status_code
    if status in (401, 403):
        return UpstreamError(
            f"{what} refused the key ({key_setting})", field=key_setting, upstream_status=status
        )
    if status == 429:
        return RateLimited(
            f"{what} is rate limiting; try again shortly", retry_after_s=_retry_after(response)
        )
    if status >= 500:
        return DependencyUnavailable(f"{what} answered {status}", upstream_status=status)
    return UpstreamError(f"{what} answered {status}", upstream_status=status)


async def search(
    http: httpx.AsyncClient, settings: Settings, query: str, *, count: int = 10
) -> dict[str, Any]:
    """Ask the configured provider; {query, provider, results: [{title, url, snippet}],
    duration_ms}."""
    query = _squash(query)
    if not query:
        raise ValidationFailed("query must not be blank", field="query")
    started = time.perf_counter()
    provider, request = search_request(http, settings, query, count)
    what = f"the search provider ({provider})"
    response, body = await guarded_get(
        http,
        settings,
        request,
        what=what,
        timeout_s=settings.tools.search_timeout_s,
        max_bytes=SEARCH_MAX_BYTES,
        too_large="a search answer's cap",
        secret_headers=frozenset({"x-subscription-token"}),
        setting="TOOLS__SEARCH_URL",
    )
    if not response.is_success:
        raise provider_failure(response, what, "TOOLS__SEARCH_API_KEY")
    try:
        data = json.loads(body)
    except ValueError:
        raise UpstreamError(f"{what} answered something that is not JSON") from None
    return {
        "query": query,
        "provider": provider,
        "results": parse_hits(provider, data, count),
        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
    }


# As agent tools -----------------------------------------------------------------------------

AGENT_TOOLS = ("web_read", "web_search")


def agent_tool(name: str, http: httpx.AsyncClient, settings: Settings) -> Tool:
    """`web_read` or `web_search` for an agent, on the run's guarded client. A refusal
    (blocked address, no provider configured, a 404) reaches the model as a tool error
    and is kept on the node with the call."""
    handler: Callable[[dict[str, Any]], Awaitable[Any]]
    if name == "web_read":

        async def read_handler(args: dict[str, Any]) -> dict[str, Any]:
            url = args.get("url")
            if not isinstance(url, str) or not url:
                raise ValueError("`url` (a string) is required")
            wanted = args.get("max_chars")
            chars = wanted if isinstance(wanted, int) and wanted > 0 else AGENT_READ_CHARS
            page = await read(http, settings, url, max_chars=max(100, chars), max_links=AGENT_LINKS)
            page.pop("duration_ms", None)
            return page

        handler = read_handler
        return Tool(
            name="web_read",
            description=(
                "Read a public web page: its title, its main text as markdown and its "
                f"links (by default the first {AGENT_READ_CHARS} characters)."
            ),
            input_schema={
                "type": "object",
                "properties": {
                    "url": {"type": "string", "description": "an http(s) URL"},
                    "max_chars": {
                        "type": "integer",
                        "minimum": 100,
                        "description": "characters of text to return at most",
                    },
                },
                "required": ["url"],
            },
            handler=handler,
        )
    if name == "web_search":

        async def search_handler(args: dict[str, Any]) -> dict[str, Any]:
            query = args.get("query")
            if not isinstance(query, str) or not query.strip():
                raise ValueError("`query` (a string) is required")
            wanted = args.get("count")
            count = min(wanted, 20) if isinstance(wanted, int) and wanted > 0 else 5
            found = await search(http, settings, query[:500], count=count)
            found.pop("duration_ms", None)
            return found

        handler = search_handler
        return Tool(
            name="web_search",
            description="Search the web; the top results with title, URL and a snippet.",
            input_schema={
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "count": {"type": "integer", "minimum": 1, "maximum": 20},
                },
                "required": ["query"],
            },
            handler=handler,
        )
    raise ValueError(f"no web tool named {name!r}")
