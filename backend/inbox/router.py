"""/api/v1/tasks (the inbox: list, read, approve, reject, claim, manual tasks),
/api/v1/task-links/{token} (decide from an e-mail without signing in) and
/api/v1/resume/{token} (a wait step's one-time resume URL)."""

from __future__ import annotations

import html
import json
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import HTMLResponse

from backend.auth.dependencies import (
    LimiterDep,
    PublicRoute,
    SettingsDep,
    WorkspaceAccess,
    require,
)
from backend.auth.permissions import Permission
from backend.inbox import service
from backend.inbox.schemas import (
    Decision,
    LinkDecision,
    ResumeAccepted,
    TaskCreate,
    TaskRead,
    TaskStatus,
)
from backend.kit.crypto import hash_token
from backend.kit.db import UnitOfWorkDep
from backend.kit.errors import ValidationFailed
from backend.kit.middleware import read_capped
from backend.kit.pagination import Page, PageParamsDep
from backend.models import Task

router = APIRouter(prefix="/tasks", tags=["tasks"])
public = APIRouter(tags=["tasks"])
READ = Permission.WORKFLOWS_READ
EXECUTE = Permission.WORKFLOWS_EXECUTE


def _on(permission: Permission) -> WorkspaceAccess:
    result: WorkspaceAccess = require(permission, resource=Task, param="task_id")
    return result


def _read(task: Task, access: WorkspaceAccess) -> TaskRead:
    out = TaskRead.model_validate(task)
    out.can_decide = task.status == "open" and service.may_act(task, access.user.id, access.role)
    return out


@router.get("")
async def list_tasks(
    uow: UnitOfWorkDep,
    page: PageParamsDep,
    status_: Annotated[TaskStatus | None, Query(alias="status")] = None,
    assigned_to: Annotated[
        Literal["me"] | None,
        Query(description="`me`: only the tasks the caller may decide"),
    ] = None,
    workflow_id: uuid.UUID | None = None,
    execution_id: uuid.UUID | None = None,
    access: WorkspaceAccess = require(READ, scope="header"),
) -> Page[TaskRead]:
    stmt = service.list_statement(
        access.workspace.id,
        status=status_,
        workflow_id=workflow_id,
        execution_id=execution_id,
        mine=(access.user.id, access.role) if assigned_to == "me" else None,
    )
    items, total = await service.list_tasks(uow.session, stmt, limit=page.limit, offset=page.offset)
    return Page(
        items=[_read(t, access) for t in items], total=total, limit=page.limit, offset=page.offset
    )


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_task(
    body: TaskCreate,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    access: WorkspaceAccess = require(EXECUTE, scope="header"),
) -> TaskRead:
    spec = service.TaskSpec(
        title=body.title,
        message=body.message,
        data=body.data,
        form=body.form,
        assignees=body.assignees,
        min_role=body.min_role,
        expires_in=body.expires_in,
        on_timeout=body.on_timeout,
        notify=body.notify,
    )
    task = await service.create_manual(
        uow, settings, workspace_id=access.workspace.id, created_by=access.user.id, spec=spec
    )
    return _read(task, access)


@router.get("/{task_id}")
async def get_task(access: WorkspaceAccess = _on(READ)) -> TaskRead:
    return _read(access.resource, access)


async def _decide(
    uow: Any, settings: Any, access: WorkspaceAccess, body: Decision, approve: bool
) -> TaskRead:
    via = "api_key" if access.principal.api_key is not None else "api"
    task = await service.decide(
        uow,
        settings,
        access.resource.id,
        user=access.user,
        role=access.role,
        approve=approve,
        comment=body.comment,
        value=body.input,
        via=via,
    )
    return _read(task, access)


@router.post("/{task_id}/approve")
async def approve_task(
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    body: Decision | None = None,
    access: WorkspaceAccess = _on(READ),
) -> TaskRead:
    """Approve (once: a task already decided answers 409 with its decision). Only the
    people the task allows; `input` must meet the task's form."""
    return await _decide(uow, settings, access, body or Decision(), True)


@router.post("/{task_id}/reject")
async def reject_task(
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    body: Decision | None = None,
    access: WorkspaceAccess = _on(READ),
) -> TaskRead:
    return await _decide(uow, settings, access, body or Decision(), False)


@router.post("/{task_id}/claim")
async def claim_task(uow: UnitOfWorkDep, access: WorkspaceAccess = _on(READ)) -> TaskRead:
    """Take the task: while claimed, only the claimer decides it."""
    task = await service.claim(uow, access.resource.id, user=access.user, role=access.role)
    return _read(task, access)


@router.delete("/{task_id}/claim")
async def release_task(uow: UnitOfWorkDep, access: WorkspaceAccess = _on(READ)) -> TaskRead:
    task = await service.unclaim(uow, access.resource.id, user=access.user, role=access.role)
    return _read(task, access)


# One-time decision links ------------------------------------------------------------------


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title></head>
<body><h1>{title}</h1><p>{message}</p><pre>{data}</pre><p>Status: {status}</p>{form}
</body></html>"""


@public.get("/task-links/{token}", dependencies=[PublicRoute], response_class=HTMLResponse)
async def view_task_link(
    token: str,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    limiter: LimiterDep,
    decision: Literal["approve", "reject"] | None = None,
) -> HTMLResponse:
    """The task behind an e-mailed link, with approve/reject buttons. Looking never
    decides (mail scanners open links); the button POSTs."""
    await limiter.hit(settings.tasks.link_rate_limit, "task-link", hash_token(token))
    task, _ = await service.link_task(uow, settings, token)
    buttons = ""
    if task.status == "open":
        choices = [decision] if decision else ["approve", "reject"]
        if "approve" in choices and not service.approvable_without_input(task):
            # Its form asks for input this page cannot take: approve in the studio (or
            # POST {decision, input} here); rejecting still works from the page.
            choices.remove("approve")
            buttons = "<p>Approving needs the task's form: open the task in the studio.</p>"
        buttons += "".join(
            f'<form method="post"><input type="hidden" name="decision" value="{c}">'
            f'<textarea name="comment" placeholder="comment"></textarea>'
            f'<button type="submit">{c.title()}</button></form>'
            for c in choices
        )
    page = _PAGE.format(
        title=html.escape(task.title),
        message=html.escape(task.message),
        data=html.escape(json.dumps(task.data, indent=2, default=str)[:20_000]),
        status=html.escape(task.status),
        form=buttons,
    )
    return HTMLResponse(
        page,
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'none'; form-action 'self'",
            "Referrer-Policy": "no-referrer",
        },
    )


@public.post("/task-links/{token}", dependencies=[PublicRoute])
async def decide_by_link(
    token: str,
    request: Request,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    limiter: LimiterDep,
) -> dict[str, Any]:
    """Decide with a one-time link: JSON `{decision, comment?, input?}` or the page's
    form. Works once, for the person it was sent to, until it expires."""
    await limiter.hit(settings.tasks.link_rate_limit, "task-link", hash_token(token))
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            raw = await request.json()
        except ValueError:
            raise ValidationFailed("the body is not JSON", field="body") from None
    else:
        form = await request.form()
        raw = {k: v for k, v in form.items() if isinstance(v, str) and v != ""}
    try:
        body = LinkDecision.model_validate(raw)
    except ValueError as exc:
        raise ValidationFailed(
            "send {decision: approve|reject, comment?, input?}", field="decision"
        ) from exc
    task = await service.decide_by_link(
        uow,
        settings,
        token,
        approve=body.decision == "approve",
        comment=body.comment,
        value=body.input,
    )
    return {"id": str(task.id), "status": task.status, "decision": task.decision}


# Resume URLs ------------------------------------------------------------------------------


@public.post("/resume/{token}", dependencies=[PublicRoute], status_code=status.HTTP_202_ACCEPTED)
async def resume(
    token: str,
    request: Request,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    limiter: LimiterDep,
) -> ResumeAccepted:
    """Resume a run's wait step, once. An optional JSON body becomes the step's output
    (`body`). A second call answers 409; a run that has ended, 409 too."""
    await limiter.hit(settings.tasks.link_rate_limit, "resume", hash_token(token))
    raw = await read_capped(request, settings.tasks.resume_max_body_bytes)
    body: Any = None
    if raw.strip():
        try:
            body = json.loads(raw)
        except ValueError:
            raise ValidationFailed("the body must be JSON (or empty)", field="body") from None
    target = await service.resume(uow, settings, token, body)
    return ResumeAccepted(execution_id=target.execution_id, node_id=target.node_id)
