"""The agent runtime: one agent turn on the Anthropic Messages API through the official
SDK, with tools, until the model stops or the iteration cap ends it clearly.

The API's "test agent" and the engine's agent nodes run this same code. Every tool
call is kept with its input and result, and every token is counted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx

from backend.config import DEFAULT_PRICES, ModelPrice, Settings
from backend.kit.errors import NotConfigured
from backend.kit.http_guard import fetch
from backend.kit.lazy import lazy_module, preload

if TYPE_CHECKING:
    import anthropic
else:
    # Imported on first use: see backend/kit/lazy.py.
    anthropic = lazy_module("anthropic")

ToolHandler = Callable[[dict[str, Any]], Awaitable[Any]]


def price_of(
    prices: Sequence[ModelPrice], model: str, usage: Any, on: date | None = None
) -> float | None:
    """The cost of one call, from the dated price table in settings: the entry with the
    longest matching model prefix that was in force on `on` (today by default). An
    estimate for reports, not a bill; an unknown model reports no cost rather than a
    wrong one."""
    day = on or datetime.now(UTC).date()
    matches = [p for p in prices if model.startswith(p.model) and p.since <= day]
    if not matches:
        return None
    price = max(matches, key=lambda p: (len(p.model), p.since))
    per_token = 1 / 1_000_000
    cache_write = getattr(usage, "cache_creation_input_tokens", 0) or 0
    cache_read = getattr(usage, "cache_read_input_tokens", 0) or 0
    return (
        (usage.input_tokens or 0) * price.input_per_mtok
        + cache_write * price.cache_write
        + cache_read * price.cache_read
        + (usage.output_tokens or 0) * price.output_per_mtok
    ) * per_token


class BudgetExceeded(RuntimeError):
    pass


@dataclass
class Budget:
    """One cap on model calls for a whole agent run, sub-agents included: a tree of
    agents calling agents must not multiply its cost unnoticed."""

    max_calls: int = 50
    calls: int = 0
    prices: Sequence[ModelPrice] = DEFAULT_PRICES

    def spend(self) -> None:
        if self.calls >= self.max_calls:
            raise BudgetExceeded(f"more than {self.max_calls} model calls in one run")
        self.calls += 1


@dataclass
class Tool:
    name: str
    description: str
    input_schema: dict[str, Any]
    handler: ToolHandler

    def spec(self) -> dict[str, Any]:
        # The schema goes to the model exactly as declared (MCP schemas included).
        return {
            "name": self.name,
            "description": self.description,
            "input_schema": self.input_schema,
        }


@dataclass
class ToolCall:
    id: str
    name: str
    input: dict[str, Any]
    output: Any = None
    error: str | None = None
    duration_ms: float = 0.0


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    def add(self, usage: Any) -> None:
        self.input_tokens += usage.input_tokens or 0
        self.output_tokens += usage.output_tokens or 0
        self.cache_creation_input_tokens += getattr(usage, "cache_creation_input_tokens", 0) or 0
        self.cache_read_input_tokens += getattr(usage, "cache_read_input_tokens", 0) or 0


@dataclass
class AgentResult:
    output: str
    stop_reason: str
    iterations: int
    model: str
    usage: Usage = field(default_factory=Usage)
    tool_calls: list[ToolCall] = field(default_factory=list)
    duration_ms: float = 0.0
    # Summed per call at each call's own model's price; None if any model is unpriced.
    cost: float | None = 0.0

    @property
    def cost_usd(self) -> float | None:
        return round(self.cost, 6) if self.cost is not None else None

    def charge(self, model: str, usage: Any, prices: Sequence[ModelPrice]) -> None:
        self.usage.add(usage)
        price = price_of(prices, model, usage)
        self.cost = None if price is None or self.cost is None else self.cost + price


@dataclass
class AgentSpec:
    model: str
    system_prompt: str
    max_tokens: int
    temperature: float | None
    tools: list[Tool]
    max_iterations: int


async def client_for(
    settings: Settings, *, timeout_s: float | None = None
) -> anthropic.AsyncAnthropic:
    """A client for the configured key; the SDK is imported off the loop the first time."""
    import os

    await preload("anthropic")

    conf = settings.anthropic
    key = conf.api_key.get_secret_value() if conf.api_key else os.environ.get("ANTHROPIC_API_KEY")
    if not key:
        raise NotConfigured(
            "no Anthropic API key: set ANTHROPIC__API_KEY (or ANTHROPIC_API_KEY)",
            field="ANTHROPIC__API_KEY",
        )
    return anthropic.AsyncAnthropic(
        api_key=key,
        # None lets the SDK read ANTHROPIC_BASE_URL itself.
        base_url=conf.base_url,
        timeout=timeout_s or conf.timeout_s,
        max_retries=conf.max_retries,
    )


async def run(
    client: anthropic.AsyncAnthropic,
    spec: AgentSpec,
    user_input: str,
    *,
    budget: Budget | None = None,
    result: AgentResult | None = None,
    on_text: Callable[[str], None] | None = None,
) -> AgentResult:
    """Run one turn. Pass `result` to have usage land in it even if the run raises
    (partial usage is still usage: it was billed); pass `on_text` to stream the model's
    text to it as it arrives."""
    budget = budget or Budget()
    started = time.perf_counter()
    tools = {t.name: t for t in spec.tools}
    messages: list[Any] = [{"role": "user", "content": user_input}]
    result = result or AgentResult(output="", stop_reason="", iterations=0, model=spec.model)
    extra: dict[str, Any] = {}
    if spec.temperature is not None:
        # The SDK (2.x) no longer types sampling parameters; models that take one
        # still read it from the request body.
        extra["extra_body"] = {"temperature": spec.temperature}
    if tools:
        extra["tools"] = [t.spec() for t in tools.values()]
    if spec.system_prompt:
        extra["system"] = spec.system_prompt
    while True:
        if result.iterations >= spec.max_iterations:
            # Ends as what it is, never as a success (n8n #22771).
            result.stop_reason = "max_iterations"
            break
        result.iterations += 1
        budget.spend()
        if on_text is None:
            response = await client.messages.create(
                model=spec.model, max_tokens=spec.max_tokens, messages=messages, **extra
            )
        else:
            # Streamed, so the text reaches followers as it is written; the final
            # message (and its usage) is the same as create() would return.
            async with client.messages.stream(
                model=spec.model, max_tokens=spec.max_tokens, messages=messages, **extra
            ) as stream:
                async for text in stream.text_stream:
                    on_text(text)
                response = await stream.get_final_message()
        result.model = response.model or spec.model
        result.charge(result.model, response.usage, budget.prices)
        result.output = "".join(b.text for b in response.content if b.type == "text")
        result.stop_reason = response.stop_reason or "end_turn"
        uses = [b for b in response.content if b.type == "tool_use"]
        if response.stop_reason != "tool_use" or not uses:
            break
        messages.append(
            {
                "role": "assistant",
                "content": [b.model_dump(exclude_none=True) for b in response.content],
            }
        )
        results: list[dict[str, Any]] = []
        for block in uses:
            call = ToolCall(
                id=block.id,
                name=block.name,
                input=dict(block.input) if isinstance(block.input, dict) else {},
            )
            t0 = time.perf_counter()
            tool = tools.get(block.name)
            try:
                if tool is None:
                    raise LookupError(f"no tool named {block.name!r}")
                call.output = await tool.handler(call.input)
                content = call.output if isinstance(call.output, str) else _json(call.output)
                results.append({"type": "tool_result", "tool_use_id": block.id, "content": content})
            except Exception as exc:
                call.error = f"{type(exc).__name__}: {exc}"
                results.append(
                    {
                        "type": "tool_result",
                        "tool_use_id": block.id,
                        "content": call.error,
                        "is_error": True,
                    }
                )
            call.duration_ms = round((time.perf_counter() - t0) * 1000, 2)
            result.tool_calls.append(call)
        messages.append({"role": "user", "content": results})
    result.duration_ms = round((time.perf_counter() - started) * 1000, 2)
    return result


def _json(value: Any) -> str:
    import json

    return json.dumps(value, default=str)


# Built-in tools ---------------------------------------------------------------------------


async def _current_time(args: dict[str, Any]) -> dict[str, str]:
    name = str(args.get("timezone") or "UTC")
    try:
        zone = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc
    return {"timezone": name, "now": datetime.now(UTC).astimezone(zone).isoformat()}


HTTP_TOOL_MAX_BYTES = 256 * 1024
HTTP_TOOL_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")


def http_tool(http: httpx.AsyncClient, settings: Settings) -> Tool:
    """`http_request` for agents: through the same SSRF guard as HTTP nodes (checked
    after DNS resolution and on every redirect), with a timeout and a response cap. A
    refusal comes back to the model as a tool error, never as a request sent."""

    async def handler(args: dict[str, Any]) -> dict[str, Any]:
        method = str(args.get("method") or "GET").upper()
        if method not in HTTP_TOOL_METHODS:
            raise ValueError(f"method must be one of {', '.join(HTTP_TOOL_METHODS)}")
        headers = {str(k): str(v) for k, v in (args.get("headers") or {}).items()}
        body = args.get("body")
        content = None
        if body is not None:
            content = (body if isinstance(body, str) else json.dumps(body)).encode()
            headers.setdefault("Content-Type", "application/json")
        request = http.build_request(
            method, str(args["url"]), headers=headers, content=content, timeout=30.0
        )
        response, raw = await fetch(
            http,
            request,
            max_redirects=settings.http.max_redirects,
            max_bytes=HTTP_TOOL_MAX_BYTES,
        )
        return {
            "status": response.status_code,
            "content_type": response.headers.get("content-type", ""),
            "body": raw.decode(errors="replace"),
        }

    return Tool(
        name="http_request",
        description=(
            "Make an HTTP request to a public URL and get its status and body "
            f"(at most {HTTP_TOOL_MAX_BYTES // 1024} KB)."
        ),
        input_schema={
            "type": "object",
            "properties": {
                "url": {"type": "string"},
                "method": {"type": "string", "enum": list(HTTP_TOOL_METHODS)},
                "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                "body": {"description": "JSON value or text"},
            },
            "required": ["url"],
        },
        handler=handler,
    )


BUILTINS: dict[str, Tool] = {
    "current_time": Tool(
        name="current_time",
        description="The current date and time, in a given IANA time zone (default UTC).",
        input_schema={
            "type": "object",
            "properties": {"timezone": {"type": "string", "description": "e.g. Europe/Paris"}},
        },
        handler=_current_time,
    ),
}
