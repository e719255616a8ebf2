"""One forced tool call on the Messages API, through the official SDK, with the retry
rules of the engine (429/529/5xx/connection retried honouring Retry-After; a spend-limit
429 never) and every token counted and priced as agent nodes count them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from backend.agents import runtime
from backend.config import Settings
from backend.kit.errors import (
    DependencyUnavailable,
    QuotaExceeded,
    RateLimited,
    UpstreamError,
)
from backend.kit.lazy import lazy_module
from backend.kit.logging import get_logger

if TYPE_CHECKING:
    import anthropic
else:
    # Imported on first use: see backend/kit/lazy.py.
    anthropic = lazy_module("anthropic")

log = get_logger(__name__)

SUBMIT_TOOL = "submit_workflow"
# The longest Retry-After we wait out inside a request; a longer one is the client's.
MAX_INLINE_WAIT_S = 10.0

Progress = Callable[[str], Awaitable[None] | None]


@dataclass
class Spend:
    """Tokens and estimated cost of every call one request made (None: a model is not
    in the price table, so the total is unknown rather than wrong)."""

    usage: runtime.Usage = field(default_factory=runtime.Usage)
    cost: float | None = 0.0
    calls: int = 0
    model: str = ""

    def charge(self, model: str, usage: Any, settings: Settings) -> None:
        self.calls += 1
        self.model = model
        self.usage.add(usage)
        price = runtime.price_of(settings.anthropic.prices, model, usage)
        self.cost = None if price is None or self.cost is None else self.cost + price

    @property
    def cost_usd(self) -> float | None:
        return round(self.cost, 6) if self.cost is not None else None

    def as_dict(self) -> dict[str, Any]:
        return {"usage": asdict(self.usage), "cost_usd": self.cost_usd, "calls": self.calls}


def is_spend_limit(exc: anthropic.APIStatusError) -> bool:
    body = (str(exc.body) if exc.body is not None else exc.message).lower()
    return exc.status_code == 429 and any(
        w in body for w in ("spend", "credit balance", "quota", "billing")
    )


def _retry_after(exc: anthropic.APIStatusError) -> float | None:
    value = exc.response.headers.get("retry-after")
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    if seconds is None or seconds != seconds or seconds < 0:
        return None
    return seconds


def _transient(exc: Exception) -> bool:
    if isinstance(exc, anthropic.APIConnectionError):  # includes timeouts
        return True
    if isinstance(exc, anthropic.APIStatusError):
        if is_spend_limit(exc):
            return False
        return exc.status_code in (408, 409, 429, 529) or exc.status_code >= 500
    return False


def refusal(exc: Exception) -> Exception:
    """The domain error a provider failure becomes (and its HTTP status, in main.py)."""
    if isinstance(exc, anthropic.APIStatusError) and is_spend_limit(exc):
        return QuotaExceeded(
            f"the model provider's spend limit is reached: {exc.message}", field="anthropic"
        )
    if isinstance(exc, anthropic.RateLimitError):
        wait = _retry_after(exc)
        return RateLimited(
            "the model provider is rate limiting; try again shortly",
            retry_after_s=int(min(max(wait or 30, 1), 3600)),
        )
    if isinstance(exc, anthropic.APITimeoutError):
        return DependencyUnavailable("the model provider did not answer in time")
    if isinstance(exc, anthropic.APIConnectionError | anthropic.InternalServerError):
        return DependencyUnavailable(
            f"the model provider is unreachable or overloaded: {type(exc).__name__}"
        )
    if isinstance(exc, anthropic.APIStatusError) and exc.status_code == 529:
        return DependencyUnavailable("the model provider is overloaded")
    if isinstance(exc, anthropic.AuthenticationError | anthropic.PermissionDeniedError):
        return UpstreamError(
            "the model provider refused the API key (ANTHROPIC__API_KEY)",
            field="ANTHROPIC__API_KEY",
        )
    if isinstance(exc, anthropic.APIStatusError):
        return UpstreamError(f"the model provider answered {exc.status_code}: {exc.message}")
    return UpstreamError(f"the model provider's answer was unusable: {type(exc).__name__}")


def _strict_refused(exc: Exception) -> bool:
    if not isinstance(exc, anthropic.BadRequestError):
        return False
    text = (str(exc.body) if exc.body is not None else exc.message).lower()
    return "strict" in text or "schema" in text


@dataclass
class Caller:
    """Asks the model to call its one tool (`submit_workflow` unless told otherwise);
    remembers whether strict input works."""

    client: anthropic.AsyncAnthropic
    settings: Settings
    model: str
    strict_schema: dict[str, Any]
    plain_schema: dict[str, Any]
    spend: Spend
    strict: bool = True
    # The forced tool; suggestions (backend/suggestions) submit through another one.
    tool_name: str = SUBMIT_TOOL
    tool_description: str = (
        "Submit the complete workflow definition: every node and connection, "
        "not only the changed ones."
    )

    def _tool(self) -> dict[str, Any]:
        tool: dict[str, Any] = {
            "name": self.tool_name,
            "description": self.tool_description,
            "input_schema": self.strict_schema if self.strict else self.plain_schema,
        }
        if self.strict:
            tool["strict"] = True
        return tool

    async def ask(
        self, system: str, messages: list[dict[str, Any]], on_progress: Progress | None = None
    ) -> Any:
        retries = self.settings.anthropic.max_retries
        attempt = 0
        while True:
            try:
                return await self._once(system, messages, on_progress)
            except Exception as exc:
                if self.strict and _strict_refused(exc):
                    # This model or endpoint does not take strict tool input: the plain
                    # schema still reaches it, and the validator checks the answer.
                    log.warning("generate.strict_refused", model=self.model)
                    self.strict = False
                    continue
                if not _transient(exc) or attempt >= retries:
                    raise refusal(exc) from exc
                wait = (
                    _retry_after(exc) if isinstance(exc, anthropic.APIStatusError) else None
                ) or min(0.5 * 2**attempt, 8.0)
                if wait > MAX_INLINE_WAIT_S:
                    raise refusal(exc) from exc
                attempt += 1
                log.info("generate.retry", attempt=attempt, wait_s=wait, error=type(exc).__name__)
                await asyncio.sleep(wait)

    async def _once(
        self, system: str, messages: list[dict[str, Any]], on_progress: Progress | None
    ) -> Any:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.settings.generate.max_tokens,
            "system": system,
            "messages": messages,
            "tools": [self._tool()],
            "tool_choice": {"type": "tool", "name": self.tool_name},
        }
        if on_progress is None:
            response = await self.client.messages.create(**kwargs)
        else:
            async with self.client.messages.stream(**kwargs) as stream:
                async for event in stream:
                    text = None
                    if event.type == "text":
                        text = event.text
                    elif event.type == "input_json":
                        text = event.partial_json
                    if text:
                        result = on_progress(text)
                        if isinstance(result, Awaitable):
                            await result
                response = await stream.get_final_message()
        self.spend.charge(response.model or self.model, response.usage, self.settings)
        return response
