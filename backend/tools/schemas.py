"""Bodies of /tools: chat, web read, web search, image generation."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Message text is the caller's own: kept exactly (no whitespace stripping, unlike
# StrictInput), but bounded.
MAX_MESSAGES = 200
MAX_TEXT = 200_000
MAX_TOTAL_TEXT = 800_000
ModelName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._:@/-]+$")]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextBlock(_Input):
    type: Literal["text"]
    text: str = Field(min_length=1, max_length=MAX_TEXT)


class ChatMessage(_Input):
    role: Literal["user", "assistant"]
    # A string, or text blocks as the Messages API takes them.
    content: str | list[TextBlock]

    @field_validator("content")
    @classmethod
    def _bounded(cls, value: str | list[TextBlock]) -> str | list[TextBlock]:
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("content must not be empty")
            if len(value) > MAX_TEXT:
                raise ValueError(f"content is longer than {MAX_TEXT} characters")
        elif not value or len(value) > 100:
            raise ValueError("content takes 1 to 100 text blocks")
        return value

    def size(self) -> int:
        if isinstance(self.content, str):
            return len(self.content)
        return sum(len(b.text) for b in self.content)


class ChatRequest(_Input):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    # Unset: ANTHROPIC__DEFAULT_MODEL.
    model: ModelName | None = None
    system: str | None = Field(default=None, max_length=MAX_TEXT)
    # Unset: TOOLS__CHAT_MAX_TOKENS, which is also the most a request may ask for.
    max_tokens: int | None = Field(default=None, ge=1, le=64_000)
    temperature: float | None = Field(default=None, ge=0, le=1)
    stop_sequences: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        default_factory=list, max_length=8
    )
    stream: bool = False

    @field_validator("messages")
    @classmethod
    def _conversation(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if messages and messages[0].role != "user":
            raise ValueError("the first message must be the user's")
        if sum(m.size() for m in messages) > MAX_TOTAL_TEXT:
            raise ValueError(f"more than {MAX_TOTAL_TEXT} characters in all")
        return messages


class UsageRead(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class ChatResult(BaseModel):
    id: str
    model: str
    text: str
    stop_reason: str
    usage: UsageRead
    # An estimate from ANTHROPIC__PRICES; null for a model not in the table.
    cost_usd: float | None
    duration_ms: float


class WebReadRequest(_Input):
    url: str = Field(min_length=1, max_length=2000)
    # Unset: TOOLS__WEB_READ_MAX_CHARS, which is also the most a request may ask for.
    max_chars: int | None = Field(default=None, ge=100, le=10_000_000)
    include_links: bool = True


class Link(BaseModel):
    url: str
    text: str


class WebReadResult(BaseModel):
    url: str
    final_url: str
    status: int
    content_type: str
    title: str
    # The page's main text as markdown (HTML), or the text as sent (plain, markdown,
    # JSON, CSV).
    text: str
    truncated: bool
    links: list[Link]
    bytes: int
    duration_ms: float


class WebSearchRequest(_Input):
    query: str = Field(min_length=1, max_length=500)
    count: int = Field(default=10, ge=1, le=20)

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        value = " ".join(value.split())
        if not value:
            raise ValueError("query must not be blank")
        return value


class SearchHit(BaseModel):
    title: str
    url: str
    snippet: str


class WebSearchResult(BaseModel):
    query: str
    provider: str
    results: list[SearchHit]
    duration_ms: float


class ImageRequest(_Input):
    prompt: str = Field(min_length=1, max_length=4000)
    n: int = Field(default=1, ge=1, le=4)
    size: str = Field(default="1024x1024", pattern=r"^(auto|[1-9][0-9]{2,3}x[1-9][0-9]{2,3})$")
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = None

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value


class Image(BaseModel):
    # One of the two, as the provider answered: the image itself, or a link to it.
    b64_json: str | None = None
    url: str | None = None
    content_type: str | None = None
    revised_prompt: str | None = None


class ImageResult(BaseModel):
    model: str
    images: list[Image]
    usage: dict[str, Any] | None
    duration_ms: float
