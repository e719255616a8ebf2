"""/api/v1/tools: `ai/chat` (JSON or server-sent events), `web/read`, `web/search`,
`ai/image`. Each spends money or reaches out of the network for the caller, so each
takes `workflows.execute` in the workspace named by X-Workspace-ID, and one request of
the caller's hourly budget (TOOLS__RATE_LIMIT, per user).

With `"stream": true`, `ai/chat` answers `text/event-stream`: `delta` events
(`{text}`) as the model writes, then one `result` (the body the JSON answer would
have had) or one `error` (`{error, detail, status, ...}`, as a JSON error body).
Everything that can be refused before the model is called (input, configuration,
budget) is refused as a plain JSON error instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from backend.auth.dependencies import LimiterDep, SettingsDep, WorkspaceAccess, require
from backend.auth.permissions import Permission
from backend.kit import sse
from backend.kit.db import UnitOfWorkDep
from backend.kit.logging import get_logger
from backend.tools import service
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

log = get_logger(__name__)
router = APIRouter(prefix="/tools", tags=["tools"])
USE = Permission.WORKFLOWS_EXECUTE


def _responses(**extra: str) -> dict[int | str, dict[str, Any]]:
    return {
        429: {"description": "This user's tool budget (TOOLS__RATE_LIMIT) or the provider's"},
        502: {"description": "The provider or site answered with an error"},
        503: {"description": "The provider or site did not answer, or Redis is down"},
        **{int(k.removeprefix("s")): {"description": v} for k, v in extra.items()},
    }


def _stream(job: Callable[[service.Emit], Awaitable[BaseModel]]) -> StreamingResponse:
    return sse.stream_job(job, failed_event="tools.stream_failed")


@router.post(
    "/ai/chat",
    responses={
        200: {
            "description": "The answer (JSON), or with `stream: true` server-sent events",
            "content": {"text/event-stream": {}},
        },
        402: {"description": "The model provider's spend limit is reached"},
        424: {"description": "No model provider key is configured (ANTHROPIC__API_KEY)"},
        **_responses(),
    },
)
async def ai_chat(
    body: ChatRequest,
    request: Request,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    limiter: LimiterDep,
    access: WorkspaceAccess = require(USE, scope="header"),
) -> ChatResult:
    """One model answer to a conversation (Claude, through the official SDK)."""
    sessions = request.app.state.sessionmaker
    if not body.stream:
        return await service.chat(uow, sessions, settings, limiter, access, body)
    params = service.chat_params(settings, body)
    await (await service.chat_client(settings)).close()
    await service.admit(uow, settings, limiter, access, model=True)

    async def job(emit: service.Emit) -> BaseModel:
        client = await service.chat_client(settings)
        return await service.chat_stream(client, sessions, settings, access, params, emit)

    return _stream(job)  # type: ignore[return-value]


@router.post("/web/read", responses=_responses())
async def web_read(
    body: WebReadRequest,
    request: Request,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    limiter: LimiterDep,
    access: WorkspaceAccess = require(USE, scope="header"),
) -> WebReadResult:
    """A page's title, main text as markdown, and links, fetched through the SSRF
    guard with size and time caps."""
    return await service.web_read(
        uow, request.app.state.sessionmaker, settings, limiter, access, body
    )


@router.post(
    "/web/search",
    responses=_responses(s424="No search provider is configured (TOOLS__SEARCH_PROVIDER)"),
)
async def web_search(
    body: WebSearchRequest,
    request: Request,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    limiter: LimiterDep,
    access: WorkspaceAccess = require(USE, scope="header"),
) -> WebSearchResult:
    """Results from the search provider named in settings."""
    return await service.web_search(
        uow, request.app.state.sessionmaker, settings, limiter, access, body
    )


@router.post(
    "/ai/image",
    responses=_responses(s424="No image provider is configured (TOOLS__IMAGE_URL)"),
)
async def ai_image(
    body: ImageRequest,
    request: Request,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    limiter: LimiterDep,
    access: WorkspaceAccess = require(USE, scope="header"),
) -> ImageResult:
    """Images from the OpenAI-compatible provider named in settings."""
    return await service.ai_image(
        uow, request.app.state.sessionmaker, settings, limiter, access, body
    )
