"""/api/v1/workflows/generate, /api/v1/workflows/{id}/generate and /api/v1/catalogue.

Generating spends money, so it takes `workflows.write` (it drafts a workflow) and a
per-workspace rate limit. With `"stream": true` the answer is `text/event-stream`:
`round` (a model answer begins), `progress` (the model's output as it is written),
`problems` (what the validator still finds after each answer, and the repairs made),
then one `result` (the body the JSON answer would have had) or one `error`
(`{error, detail, status, ...}`, as the JSON answer's error body).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from backend.agents import runtime
from backend.auth.dependencies import LimiterDep, SettingsDep, WorkspaceAccess, require
from backend.auth.permissions import Permission as P  # noqa: N817 - reads as a table
from backend.config import Settings
from backend.generate import catalogue, service
from backend.generate.schemas import EditRequest, EditResult, GenerateRequest, GenerateResult
from backend.kit import sse
from backend.kit.db import UnitOfWork, UnitOfWorkDep
from backend.kit.logging import get_logger
from backend.kit.ratelimit import RateLimiter
from backend.models import Workflow

log = get_logger(__name__)
router = APIRouter(tags=["generate"])

ERRORS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The draft (JSON), or with `stream: true` server-sent events",
        "content": {"text/event-stream": {}},
    },
    402: {"description": "The provider's spend limit, or this request's cap of 0"},
    424: {"description": "No model provider key is configured"},
    429: {"description": "Too many generations in this workspace, or provider rate limit"},
    502: {"description": "The model provider refused the request or answered nonsense"},
    503: {"description": "The model provider is unreachable, or the request timed out"},
}


Job = Callable[[UnitOfWork, service.Emit], Awaitable[BaseModel]]


def _stream(request: Request, job: Job) -> StreamingResponse:
    """Run `job` in a unit of work of its own (the request's closes before the body is
    sent) and stream what it emits."""

    async def in_its_own_unit_of_work(emit: service.Emit) -> BaseModel:
        async with UnitOfWork(request.app.state.sessionmaker) as uow:
            return await job(uow, emit)

    return sse.stream_job(in_its_own_unit_of_work, failed_event="generate.stream_failed")


async def _preflight(
    uow: UnitOfWork,
    settings: Settings,
    limiter: RateLimiter,
    access: WorkspaceAccess,
    data: GenerateRequest | EditRequest,
) -> None:
    """What can be refused before a stream starts is refused as a plain JSON error."""
    service.check_types(data.constraints.node_types)
    await service.context_lists(uow, access, data.agent_ids, data.credential_ids)
    client = await runtime.client_for(settings)
    await client.close()
    await service.hit_limit(settings, limiter, access)


@router.get("/catalogue")
async def get_catalogue(
    access: WorkspaceAccess = require(P.WORKFLOWS_READ, scope="header"),
) -> dict[str, Any]:
    """Every node type and kind with its config schema (JSON Schema, from the same
    pydantic schemas the validator uses), and the schema of a whole definition."""
    return catalogue.catalogue()


@router.post("/workflows/generate", responses=ERRORS)
async def generate_workflow(
    body: GenerateRequest,
    request: Request,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    limiter: LimiterDep,
    access: WorkspaceAccess = require(P.WORKFLOWS_WRITE, scope="header"),
) -> GenerateResult:
    if body.stream:
        await _preflight(uow, settings, limiter, access, body)

        async def job(job_uow: UnitOfWork, emit: service.Emit) -> BaseModel:
            return await service.generate(
                job_uow, settings, limiter, access, body, emit, limited=False
            )

        return _stream(request, job)  # type: ignore[return-value]
    return await service.generate(uow, settings, limiter, access, body)


@router.post("/workflows/{workflow_id}/generate", responses=ERRORS)
async def edit_workflow(
    body: EditRequest,
    request: Request,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    limiter: LimiterDep,
    access: WorkspaceAccess = require(P.WORKFLOWS_WRITE, resource=Workflow, param="workflow_id"),
) -> EditResult:
    if body.stream:
        await _preflight(uow, settings, limiter, access, body)

        async def job(job_uow: UnitOfWork, emit: service.Emit) -> BaseModel:
            return await service.edit(job_uow, settings, limiter, access, body, emit, limited=False)

        return _stream(request, job)  # type: ignore[return-value]
    return await service.edit(uow, settings, limiter, access, body)
