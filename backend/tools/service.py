"""The tools API's work: each request is checked (input, configuration) before it spends
anything, then counted against the caller's hourly budget (TOOLS__RATE_LIMIT, per
user, across workspaces and API keys), then run, and its usage (tokens, estimated
cost, success) is written to `tool_usage` whatever the outcome.

Usage goes in a transaction of its own: a refused or failed call is still a call
(and a model call that streamed half an answer was billed for that half), so the row
must not share the fate of the request's unit of work. The request's own transaction
is committed before any outbound call, so no pooled connection waits on a model or a
web site.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.agents import runtime
from backend.auth.dependencies import WorkspaceAccess
from backend.config import Settings
from backend.generate.model import refusal as provider_refusal
from backend.kit.db import UnitOfWork
from backend.kit.errors import DependencyUnavailable, DomainError, ValidationFailed
from backend.kit.http_guard import guarded_client
from backend.kit.lazy import lazy_module
from backend.kit.logging import get_logger
from backend.kit.ratelimit import RateLimiter
from backend.models import ToolUsage
from backend.quotas import service as quotas
from backend.tools import image, web
from backend.tools.schemas import (
    ChatRequest,
    ChatResult,
    ImageRequest,
    ImageResult,
    WebReadRequest,
    WebReadResult,
    WebSearchRequest,
    WebSearchResult,
)

if TYPE_CHECKING:
    import anthropic
else:
    # Imported on first use: see backend/kit/lazy.py.
    anthropic = lazy_module("anthropic")

log = get_logger(__name__)

Sessions = async_sessionmaker[AsyncSession]
Emit = Callable[[str, dict[str, Any]], Awaitable[None]]


@dataclass
class Meter:
    """What one call used: tokens, and cost at each call's own model's price (None: the
    model is not in ANTHROPIC__PRICES, so the cost is unknown rather than wrong)."""

    tool: str
    model: str | None = None
    usage: runtime.Usage = field(default_factory=runtime.Usage)
    cost: float | None = None

    def charge(self, model: str, usage: Any, settings: Settings) -> None:
        self.model = model
        self.usage.add(usage)
        self.cost = runtime.price_of(settings.anthropic.prices, model, usage)

    @property
    def cost_usd(self) -> float | None:
        return round(self.cost, 6) if self.cost is not None else None


async def admit(
    uow: UnitOfWork,
    settings: Settings,
    limiter: RateLimiter,
    access: WorkspaceAccess,
    *,
    model: bool = False,
) -> None:
    """Spend one request of the caller's hourly budget (429 with Retry-After when it is
    spent; 503 when Redis cannot say: these calls cost money, so the budget fails
    closed), then reserve one of the workspace's tool calls (QUOTAS__TOOL_CALLS_PER_HOUR)
    and, for a model call, check its monthly AI tokens and cost (402 naming the quota).
    The user's budget goes first: one user's refused flood does not eat the workspace's
    quota."""
    await limiter.hit(settings.tools.rate_limit, "tools", str(access.user.id), what="tool requests")
    await quotas.admit_tool_calls(uow.session, access.workspace.id, settings=settings)
    if model:
        await quotas.check_ai(uow.session, access.workspace.id, settings)


async def record(sessions: Sessions, access: WorkspaceAccess, meter: Meter, *, ok: bool) -> None:
    row = ToolUsage(
        id=uuid.uuid4(),
        workspace_id=access.workspace.id,
        user_id=access.user.id,
        tool=meter.tool,
        model=meter.model,
        input_tokens=meter.usage.input_tokens
        + meter.usage.cache_creation_input_tokens
        + meter.usage.cache_read_input_tokens,
        output_tokens=meter.usage.output_tokens,
        cost_usd=meter.cost_usd,
        ok=ok,
    )
    try:
        async with UnitOfWork(sessions) as uow:
            uow.session.add(row)
        # The workspace's monthly AI counters, which are rebuilt from these rows.
        await quotas.spend_ai(
            access.workspace.id, row.input_tokens + row.output_tokens, row.cost_usd or 0.0
        )
    except Exception as exc:
        # The answer was paid for; losing it because the usage row failed would be
        # worse than the missing row, which the log keeps.
        log.warning(
            "tools.usage_not_recorded",
            tool=meter.tool,
            workspace_id=str(access.workspace.id),
            input_tokens=row.input_tokens,
            output_tokens=row.output_tokens,
            error=type(exc).__name__,
        )


def _within(value: int | None, cap: int, name: str, setting: str) -> int:
    if value is not None and value > cap:
        raise ValidationFailed(f"{name} may be at most {cap} ({setting})", field=name)
    return value or cap


def _http(settings: Settings) -> Any:
    return guarded_client(settings.http.allow_private_networks, user_agent=settings.http.user_agent)


# Chat -------------------------------------------------------------------------------------


def chat_params(settings: Settings, data: ChatRequest) -> dict[str, Any]:
    params: dict[str, Any] = {
        "model": data.model or settings.anthropic.default_model,
        "max_tokens": _within(
            data.max_tokens, settings.tools.chat_max_tokens, "max_tokens", "TOOLS__CHAT_MAX_TOKENS"
        ),
        "messages": [m.model_dump(mode="json") for m in data.messages],
    }
    if data.system:
        params["system"] = data.system
    if data.stop_sequences:
        params["stop_sequences"] = data.stop_sequences
    if data.temperature is not None:
        # The SDK (2.x) no longer types sampling parameters; models that take one still
        # read it from the body (as the agent runtime sends it).
        params["extra_body"] = {"temperature": data.temperature}
    return params


def chat_refusal(exc: BaseException) -> DomainError:
    """The domain error a failed model call becomes. The caller wrote the request, so
    what the provider refuses as invalid is a 422, not our 502."""
    if isinstance(exc, TimeoutError):
        return DependencyUnavailable("the model provider did not answer in time")
    if isinstance(exc, anthropic.NotFoundError):
        return ValidationFailed(
            f"the model provider does not know it: {exc.message}", field="model"
        )
    if isinstance(exc, anthropic.BadRequestError | anthropic.UnprocessableEntityError):
        return ValidationFailed(f"the model provider refused the request: {exc.message}")
    if isinstance(exc, anthropic.APIError):
        failure = provider_refusal(exc)
        if isinstance(failure, DomainError):
            return failure
    return DependencyUnavailable(f"the model call failed: {type(exc).__name__}")


def _chat_result(message: Any, meter: Meter, started: float) -> ChatResult:
    return ChatResult.model_validate(
        {
            "id": message.id,
            "model": message.model or meter.model,
            "text": "".join(b.text for b in message.content if b.type == "text"),
            "stop_reason": message.stop_reason or "end_turn",
            "usage": asdict(meter.usage),
            "cost_usd": meter.cost_usd,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        }
    )


async def chat_client(settings: Settings) -> anthropic.AsyncAnthropic:
    """424 naming ANTHROPIC__API_KEY when no key is configured."""
    return await runtime.client_for(settings)


async def chat(
    uow: UnitOfWork,
    sessions: Sessions,
    settings: Settings,
    limiter: RateLimiter,
    access: WorkspaceAccess,
    data: ChatRequest,
) -> ChatResult:
    params = chat_params(settings, data)
    client = await chat_client(settings)
    try:
        await admit(uow, settings, limiter, access, model=True)
        await uow.commit()
        meter = Meter("ai_chat", params["model"])
        started = time.perf_counter()
        try:
            async with asyncio.timeout(settings.anthropic.timeout_s):
                message = await client.messages.create(**params)
        except (anthropic.APIError, TimeoutError) as exc:
            await record(sessions, access, meter, ok=False)
            raise chat_refusal(exc) from exc
        meter.charge(message.model or params["model"], message.usage, settings)
        await record(sessions, access, meter, ok=True)
        return _chat_result(message, meter, started)
    finally:
        await client.close()


async def chat_stream(
    client: anthropic.AsyncAnthropic,
    sessions: Sessions,
    settings: Settings,
    access: WorkspaceAccess,
    params: dict[str, Any],
    emit: Emit,
) -> ChatResult:
    """Stream one answer: `delta` events as the text is written, and the result. What
    was billed is recorded even if the client goes away mid-answer (the task is
    cancelled then) or the call fails."""
    meter = Meter("ai_chat", params["model"])
    started = time.perf_counter()
    ok = False
    snapshot: Any = None
    try:
        async with client.messages.stream(**params) as stream:
            try:
                async for text in stream.text_stream:
                    await emit("delta", {"text": text})
                message = await stream.get_final_message()
            finally:
                try:
                    snapshot = stream.current_message_snapshot
                except AssertionError:  # nothing arrived yet: nothing was billed
                    snapshot = None
        ok = True
        meter.charge(message.model or params["model"], message.usage, settings)
        return _chat_result(message, meter, started)
    except anthropic.APIError as exc:
        raise chat_refusal(exc) from exc
    finally:
        if not ok and snapshot is not None:
            meter.charge(snapshot.model or params["model"], snapshot.usage, settings)
        await client.close()
        # Shielded: a cancelled stream still writes what it used.
        await asyncio.shield(record(sessions, access, meter, ok=ok))


# Web ----------------------------------------------------------------------------------------


async def web_read(
    uow: UnitOfWork,
    sessions: Sessions,
    settings: Settings,
    limiter: RateLimiter,
    access: WorkspaceAccess,
    data: WebReadRequest,
) -> WebReadResult:
    web.check_url(data.url)
    max_chars = _within(
        data.max_chars, settings.tools.web_read_max_chars, "max_chars", "TOOLS__WEB_READ_MAX_CHARS"
    )
    await admit(uow, settings, limiter, access)
    await uow.commit()
    meter = Meter("web_read", cost=0.0)
    async with _http(settings) as http:
        try:
            page = await web.read(
                http, settings, data.url, max_chars=max_chars, include_links=data.include_links
            )
        except DomainError:
            await record(sessions, access, meter, ok=False)
            raise
    await record(sessions, access, meter, ok=True)
    return WebReadResult.model_validate(page)


async def web_search(
    uow: UnitOfWork,
    sessions: Sessions,
    settings: Settings,
    limiter: RateLimiter,
    access: WorkspaceAccess,
    data: WebSearchRequest,
) -> WebSearchResult:
    provider, _, _ = web.search_provider(settings)
    await admit(uow, settings, limiter, access)
    await uow.commit()
    meter = Meter("web_search", provider)
    async with _http(settings) as http:
        try:
            found = await web.search(http, settings, data.query, count=data.count)
        except DomainError:
            await record(sessions, access, meter, ok=False)
            raise
    await record(sessions, access, meter, ok=True)
    return WebSearchResult.model_validate(found)


async def ai_image(
    uow: UnitOfWork,
    sessions: Sessions,
    settings: Settings,
    limiter: RateLimiter,
    access: WorkspaceAccess,
    data: ImageRequest,
) -> ImageResult:
    image.check_configured(settings)
    await admit(uow, settings, limiter, access)
    await uow.commit()
    meter = Meter("ai_image", settings.tools.image_model)
    async with _http(settings) as http:
        try:
            made = await image.generate(
                http, settings, prompt=data.prompt, n=data.n, size=data.size, quality=data.quality
            )
        except DomainError:
            await record(sessions, access, meter, ok=False)
            raise
    meter.model = made["model"]
    meter.usage.input_tokens, meter.usage.output_tokens = image.tokens_of(made["usage"])
    await record(sessions, access, meter, ok=True)
    return ImageResult.model_validate(made)
