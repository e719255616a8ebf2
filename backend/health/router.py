"""`/health` says the process is alive; `/health/ready` says it can serve traffic."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from backend.health.service import readiness

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


READINESS_DOWN = {
    "type": "object",
    "required": ["error", "detail", "checks"],
    "properties": {
        "error": {"type": "string", "enum": ["dependency_unavailable"]},
        "detail": {"type": "string"},
        "checks": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


@router.get(
    "/health/ready",
    responses={
        503: {
            "description": "A dependency is unreachable",
            "content": {"application/json": {"schema": READINESS_DOWN}},
        }
    },
)
async def ready(request: Request) -> JSONResponse:
    state = request.app.state
    checks = await readiness(
        state.engine, state.redis, state.celery, state.settings.health_timeout_s
    )
    down = sorted(name for name, result in checks.items() if result != "ok")
    if down:
        return JSONResponse(
            status_code=503,
            content={
                "error": "dependency_unavailable",
                "detail": f"unreachable: {', '.join(down)}",
                "checks": checks,
            },
        )
    return JSONResponse({"status": "ok", "checks": checks})
