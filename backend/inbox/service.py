"""Tasks: what people decide. An approval step opens one and its run parks; a decision
(by someone the task allows, once), its expiry or its run's end moves it on, and a
decision or an expiry wakes the run (the lifecycle's `wake`), whose approval step then
reads the decision as its output. Manual tasks have no run.

A task moves on exactly once: every change is one `UPDATE ... WHERE status = 'open'`,
so two deciders (or a decider and the expiry pass) cannot both win; the loser gets the
first decision back (409).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema_rs
from sqlalchemy import Select, and_, false, func, or_, select, text, true, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.permissions import Role
from backend.config import Settings
from backend.executions import lifecycle
from backend.inbox import links
from backend.kit.db import UnitOfWork
from backend.kit.errors import Conflict, NotFound, PermissionDenied, ValidationFailed
from backend.kit.logging import get_logger
from backend.models import ActionLink, Task, User, WorkspaceMember
from backend.push import service as people

log = get_logger(__name__)
OPEN, APPROVED, REJECTED, EXPIRED, CANCELLED = (
    "open",
    "approved",
    "rejected",
    "expired",
    "cancelled",
)
DECIDED = (APPROVED, REJECTED, EXPIRED)


def _now() -> datetime:
    return datetime.now(UTC)


# Who may act ---------------------------------------------------------------------------------


def may_act(task: Task, user_id: uuid.UUID, role: Role) -> bool:
    """Named people, and/or members of at least `min_role`; neither given: the members
    who may execute workflows (editor and up)."""
    if user_id in (task.assignee_ids or []):
        return True
    if task.min_role is not None:
        return role.at_least(Role(task.min_role))
    if task.assignee_ids:
        return False
    return role.at_least(Role.EDITOR)


def _actable_clause(user_id: uuid.UUID, role: Role) -> Any:
    """SQL for may_act (the inbox's `assigned_to=me`)."""
    roles = [r.value for r in Role if role.at_least(r)]
    return or_(
        Task.assignee_ids.contains([user_id]),
        Task.min_role.in_(roles),
        and_(
            func.cardinality(Task.assignee_ids) == 0,
            Task.min_role.is_(None),
            true() if role.at_least(Role.EDITOR) else false(),
        ),
    )


async def deciders(session: AsyncSession, task: Task) -> list[uuid.UUID]:
    """Everyone the task lets decide, members of its workspace only."""
    rows = await session.execute(
        select(WorkspaceMember.user_id, WorkspaceMember.role).where(
            WorkspaceMember.workspace_id == task.workspace_id
        )
    )
    return [user_id for user_id, role in rows.all() if may_act(task, user_id, Role(role))]


# Reading -------------------------------------------------------------------------------------


def list_statement(
    workspace_id: uuid.UUID,
    *,
    status: str | None,
    workflow_id: uuid.UUID | None,
    execution_id: uuid.UUID | None,
    mine: tuple[uuid.UUID, Role] | None,
) -> Select[Any]:
    stmt = select(Task).where(Task.workspace_id == workspace_id)
    if status:
        stmt = stmt.where(Task.status == status)
    if workflow_id:
        stmt = stmt.where(Task.workflow_id == workflow_id)
    if execution_id:
        stmt = stmt.where(Task.execution_id == execution_id)
    if mine is not None:
        stmt = stmt.where(_actable_clause(*mine))
    return stmt.order_by(Task.created_at.desc(), Task.id)


async def list_tasks(
    session: AsyncSession, stmt: Select[Any], *, limit: int, offset: int
) -> tuple[Sequence[Task], int]:
    total = await session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery()))
    rows = await session.scalars(stmt.limit(limit).offset(offset))
    return list(rows), int(total or 0)


# Opening -------------------------------------------------------------------------------------


@dataclass
class TaskSpec:
    title: str
    message: str
    data: Any
    form: dict[str, Any] | None
    assignees: list[uuid.UUID]
    min_role: str | None
    expires_in: int | None
    on_timeout: str
    notify: bool = True


async def _members(session: AsyncSession, workspace_id: uuid.UUID) -> set[uuid.UUID]:
    rows = await session.scalars(
        select(WorkspaceMember.user_id).where(WorkspaceMember.workspace_id == workspace_id)
    )
    return set(rows)


async def create_manual(
    uow: UnitOfWork,
    settings: Settings,
    *,
    workspace_id: uuid.UUID,
    created_by: uuid.UUID,
    spec: TaskSpec,
) -> Task:
    members = await _members(uow.session, workspace_id)
    for index, user_id in enumerate(spec.assignees):
        if user_id not in members:
            raise ValidationFailed(
                "assignee is not a member of this workspace", field=f"assignees[{index}]"
            )
    task = Task(
        id=uuid.uuid4(),
        workspace_id=workspace_id,
        kind="manual",
        status=OPEN,
        title=spec.title,
        message=spec.message,
        data=spec.data,
        form=spec.form,
        assignee_ids=list(dict.fromkeys(spec.assignees)),
        min_role=spec.min_role,
        expires_at=_now() + timedelta(seconds=spec.expires_in) if spec.expires_in else None,
        on_timeout=spec.on_timeout,
        created_by=created_by,
    )
    uow.session.add(task)
    await uow.session.flush()
    await _opened(uow, settings, task, notify=spec.notify)
    return task


async def _opened(uow: UnitOfWork, settings: Settings, task: Task, *, notify: bool) -> None:
    """Announce a new task; tell the people who may decide it (e-mail with one-time
    links, in-app, push) unless told not to."""
    who = await deciders(uow.session, task)
    event = {"type": "task.created", "task": brief(task)}
    people.publish_to_workspace_after_commit(uow, task.workspace_id, event)
    people.publish_to_users_after_commit(uow, who, event)
    if not notify or not who:
        return
    link_expiry = _now() + timedelta(seconds=settings.tasks.link_ttl_s)
    if task.expires_at is not None:
        link_expiry = min(link_expiry, task.expires_at)
    tokens: dict[uuid.UUID, str] = {}
    for user_id in who[: people.MAX_RECIPIENTS]:
        link = ActionLink(
            id=uuid.uuid4(),
            purpose="decide",
            task_id=task.id,
            user_id=user_id,
            expires_at=link_expiry.replace(microsecond=0),
        )
        uow.session.add(link)
        assert link.expires_at is not None
        tokens[user_id] = links.decide_token(settings, link.id, task.id, user_id, link.expires_at)

    def email(user: User) -> tuple[str, str] | None:
        token = tokens.get(user.id)
        if token is None:
            return None
        url = links.decide_url(settings, token)
        expiry = f"\nIt expires at {task.expires_at.isoformat()}." if task.expires_at else ""
        body = (
            f"{task.message}\n\n" if task.message else ""
        ) + (
            f"Approve: {url}?decision=approve\nReject:  {url}?decision=reject\n\n"
            "Each link works once and only for you; opening it shows the task, and the "
            f"page's button (a POST) records your decision.{expiry}\n"
            f"Or decide in the app: task {task.id}."
        )  # fmt: skip
        return f"Decision needed: {task.title}", body

    await people.notify(
        uow,
        settings,
        who,
        kind="task.assigned",
        title=f"Decision needed: {task.title}",
        body=task.message[:1000],
        data={"task_id": str(task.id), "execution_id": str(task.execution_id or "")},
        workspace_id=task.workspace_id,
        email=email,
    )


def brief(task: Task) -> dict[str, Any]:
    return {
        "id": str(task.id),
        "kind": task.kind,
        "status": task.status,
        "title": task.title,
        "execution_id": str(task.execution_id) if task.execution_id else None,
        "node_id": task.node_id,
        "workflow_id": str(task.workflow_id) if task.workflow_id else None,
        "expires_at": task.expires_at.isoformat() if task.expires_at else None,
        "decision": task.decision,
    }


# Deciding ------------------------------------------------------------------------------------


def check_input(task: Task, value: Any) -> None:
    """Form input against the task's JSON Schema; each problem names its field."""
    if task.form is None:
        if value is not None:
            raise ValidationFailed("this task has no form: send no input", field="input")
        return
    if value is None:
        value = {}
    # jsonschema-rs: its regex engine runs in linear time, so a form's `pattern` cannot
    # be made to backtrack for minutes by what a decider sends.
    try:
        # offline: a remote `$ref` is never fetched (this runs on public link pages too).
        validator = jsonschema_rs.validator_for(task.form, offline=True)
    except (ValueError, jsonschema_rs.ValidationError) as exc:
        raise ValidationFailed(f"the task's form is not usable: {exc}", field="form") from None
    for error in validator.iter_errors(value):
        where = ".".join(str(p) for p in error.instance_path)
        raise ValidationFailed(
            f"input does not match the form: {error.message}",
            field="input" + (f".{where}" if where else ""),
        )


def approvable_without_input(task: Task) -> bool:
    """Whether an approval with no form input would be accepted (the e-mail's page,
    which has no form, offers Approve only then)."""
    try:
        check_input(task, None)
    except ValidationFailed:
        return False
    return True


async def _lock(session: AsyncSession, task_id: uuid.UUID) -> Task:
    task = await session.get(Task, task_id, with_for_update=True, populate_existing=True)
    if task is None:
        raise NotFound("task not found")
    return task


def _already(task: Task) -> Conflict:
    return Conflict(
        f"this task is already {task.status}",
        field="status",
        task_status=task.status,
        decision=task.decision,
    )


async def decide(
    uow: UnitOfWork,
    settings: Settings,
    task_id: uuid.UUID,
    *,
    user: User,
    role: Role,
    approve: bool,
    comment: str | None,
    value: Any,
    via: str,
) -> Task:
    """Record one decision (the first one wins; later ones get 409 with it)."""
    session = uow.session
    task = await _lock(session, task_id)
    now = _now()
    if task.status == OPEN and task.expires_at is not None and task.expires_at <= now:
        await _expire(uow, task, now)
    if task.status != OPEN:
        raise _already(task)
    if not may_act(task, user.id, role):
        raise PermissionDenied("this task is not yours to decide")
    if task.claimed_by is not None and task.claimed_by != user.id:
        raise Conflict("someone else claimed this task", field="claimed_by")
    if approve or value is not None:
        # The form is what an approval needs; a rejection needs none (the e-mail's
        # page has no form, and a required field must not keep anyone from saying no).
        check_input(task, value)
    status = APPROVED if approve else REJECTED
    decision = {
        "decision": status,
        "task_id": str(task.id),
        "decided_by": str(user.id),
        "decided_by_email": user.email,
        "decided_at": now.isoformat(),
        "comment": comment,
        "input": value,
        "via": via,
    }
    await _move(session, task, status, decision, now, decided_by=user.id)
    await _after_decision(uow, settings, task, actor=f"user:{user.id}")
    return task


async def _move(
    session: AsyncSession,
    task: Task,
    status: str,
    decision: dict[str, Any] | None,
    now: datetime,
    *,
    decided_by: uuid.UUID | None = None,
) -> None:
    """The one change of an open task (the caller holds its row lock)."""
    await session.execute(
        update(Task)
        .where(Task.id == task.id, Task.status == OPEN)
        .values(status=status, decision=decision, decided_at=now, decided_by=decided_by)
    )
    await session.refresh(task)


async def _after_decision(uow: UnitOfWork, settings: Settings, task: Task, *, actor: str) -> None:
    event = {"type": "task.decided", "task": brief(task)}
    people.publish_to_workspace_after_commit(uow, task.workspace_id, event)
    people.publish_to_users_after_commit(uow, await deciders(uow.session, task), event)
    if task.execution_id is not None:
        await lifecycle.wake(uow, task.execution_id, actor=actor, reason=f"task {task.status}")
    if task.created_by is not None and task.kind == "manual" and task.status in DECIDED:
        await people.notify(
            uow,
            settings,
            [task.created_by],
            kind="task.decided",
            title=f"Task {task.status}: {task.title}",
            data={"task_id": str(task.id)},
            workspace_id=task.workspace_id,
        )


def timeout_decision(task: Task, now: datetime) -> dict[str, Any]:
    outcome = {"approve": APPROVED, "reject": REJECTED}.get(task.on_timeout)
    return {
        "decision": outcome,
        "task_id": str(task.id),
        "expired": True,
        "on_timeout": task.on_timeout,
        "decided_by": None,
        "decided_at": now.isoformat(),
        "comment": None,
        "input": None,
        "via": "timeout",
    }


async def _expire(uow: UnitOfWork, task: Task, now: datetime) -> None:
    await _move(uow.session, task, EXPIRED, timeout_decision(task, now), now)
    event = {"type": "task.expired", "task": brief(task)}
    people.publish_to_workspace_after_commit(uow, task.workspace_id, event)


async def claim(uow: UnitOfWork, task_id: uuid.UUID, *, user: User, role: Role) -> Task:
    task = await _lock(uow.session, task_id)
    if task.status != OPEN:
        raise _already(task)
    if not may_act(task, user.id, role):
        raise PermissionDenied("this task is not yours to decide")
    if task.claimed_by is not None and task.claimed_by != user.id:
        raise Conflict("someone else claimed this task", field="claimed_by")
    task.claimed_by, task.claimed_at = user.id, _now()
    await uow.session.flush()
    people.publish_to_workspace_after_commit(
        uow, task.workspace_id, {"type": "task.claimed", "task": brief(task)}
    )
    return task


async def unclaim(uow: UnitOfWork, task_id: uuid.UUID, *, user: User, role: Role) -> Task:
    task = await _lock(uow.session, task_id)
    if task.status != OPEN:
        raise _already(task)
    if task.claimed_by is None:
        return task
    if task.claimed_by != user.id and not role.at_least(Role.ADMINISTRATOR):
        raise PermissionDenied("only whoever claimed it (or an administrator) can release it")
    task.claimed_by, task.claimed_at = None, None
    await uow.session.flush()
    return task


# Expiry --------------------------------------------------------------------------------------


async def expire_due(sessionmaker: async_sessionmaker[AsyncSession], *, batch: int = 200) -> int:
    """Open tasks past their deadline expire (their `on_timeout` decides) and their runs
    wake to take that branch. Beat runs this; an approval step that resumes first does
    the same for its own task."""
    total = 0
    while True:
        async with UnitOfWork(sessionmaker) as uow:
            now = _now()
            due = (
                await uow.session.scalars(
                    select(Task)
                    .where(Task.status == OPEN, Task.expires_at <= now)
                    .order_by(Task.expires_at)
                    .limit(batch)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            for task in due:
                await _expire(uow, task, now)
                if task.execution_id is not None:
                    await lifecycle.wake(
                        uow, task.execution_id, actor="expiry", reason="task expired"
                    )
        total += len(due)
        if len(due) < batch:
            return total


# Runs ----------------------------------------------------------------------------------------


@dataclass
class StepState:
    """What an approval step finds: a decision (its output and branch), a failure
    (expired with on_timeout=fail, or its task cancelled), or still waiting."""

    task_id: uuid.UUID
    decision: dict[str, Any] | None = None
    failure: str | None = None
    expires_at: datetime | None = None


async def _earlier_decision(
    session: AsyncSession, execution_id: uuid.UUID, node_id: str, iteration: int
) -> Task | None:
    """A decided task of the same step in the run this one retries (or its source):
    a retry re-opens nothing already decided."""
    row = await session.scalar(
        text(
            """
WITH RECURSIVE chain(id, retry_of, depth) AS (
  SELECT id, retry_of, 0 FROM workflow_executions WHERE id = :id
  UNION ALL
  SELECT e.id, e.retry_of, c.depth + 1 FROM workflow_executions e
  JOIN chain c ON e.id = c.retry_of WHERE c.depth < 50
)
SELECT t.id FROM tasks t JOIN chain c ON t.execution_id = c.id
WHERE c.depth > 0 AND t.node_id = :node_id AND t.iteration = :iteration
  AND t.status IN ('approved', 'rejected', 'expired')
ORDER BY c.depth LIMIT 1
"""
        ),
        {"id": execution_id, "node_id": node_id, "iteration": iteration},
    )
    return None if row is None else await session.get(Task, row)


async def approval_step(
    sessionmaker: async_sessionmaker[AsyncSession],
    settings: Settings,
    *,
    workspace_id: uuid.UUID,
    workflow_id: uuid.UUID,
    execution_id: uuid.UUID,
    node_id: str,
    iteration: int,
    spec: TaskSpec,
) -> StepState:
    """The approval step's one look at its task: opened on the first look (once, by its
    unique key), then decided, expired (now, if its deadline passed) or still open."""
    async with UnitOfWork(sessionmaker) as uow:
        session = uow.session
        task = await session.scalar(
            select(Task)
            .where(
                Task.execution_id == execution_id,
                Task.node_id == node_id,
                Task.iteration == iteration,
            )
            .with_for_update()
        )
        if task is None:
            earlier = await _earlier_decision(session, execution_id, node_id, iteration)
            if earlier is not None:
                return _state(earlier)
            members = await _members(session, workspace_id)
            assignees = [u for u in dict.fromkeys(spec.assignees) if u in members]
            values = {
                "id": uuid.uuid4(),
                "workspace_id": workspace_id,
                "kind": "approval",
                "status": OPEN,
                "title": spec.title[:500],
                "message": spec.message,
                "data": spec.data,
                "form": spec.form,
                "assignee_ids": assignees,
                # Assignees named but none of them a member: nobody could decide;
                # fall back to the default deciders rather than wait for ever.
                "min_role": spec.min_role,
                "execution_id": execution_id,
                "workflow_id": workflow_id,
                "node_id": node_id,
                "iteration": iteration,
                "expires_at": (
                    _now() + timedelta(seconds=spec.expires_in) if spec.expires_in else None
                ),
                "on_timeout": spec.on_timeout,
            }
            task = await session.scalar(
                insert(Task).values(**values).on_conflict_do_nothing().returning(Task),
                execution_options={"populate_existing": True},
            )
            if task is None:
                # Another attempt of this step opened it a moment ago.
                task = await session.scalar(
                    select(Task).where(
                        Task.execution_id == execution_id,
                        Task.node_id == node_id,
                        Task.iteration == iteration,
                    )
                )
                assert task is not None
            else:
                await _opened(uow, settings, task, notify=spec.notify)
                log.info("task.opened", task_id=str(task.id), execution_id=str(execution_id))
        now = _now()
        if task.status == OPEN and task.expires_at is not None and task.expires_at <= now:
            await _expire(uow, task, now)
        return _state(task)


def _state(task: Task) -> StepState:
    if task.status in (APPROVED, REJECTED):
        return StepState(task.id, decision=task.decision)
    if task.status == EXPIRED:
        decision = task.decision or {}
        if decision.get("decision") is None:
            return StepState(task.id, failure="the approval expired (on_timeout: fail)")
        return StepState(task.id, decision=decision)
    if task.status == CANCELLED:
        return StepState(task.id, failure="the approval task was cancelled")
    return StepState(task.id, expires_at=task.expires_at)


async def cancel_open_for_run(uow: UnitOfWork, execution_id: uuid.UUID, reason: str) -> int:
    """A run that ended takes its open tasks with it (decided ones stay as they are)."""
    now = _now()
    rows = (
        await uow.session.scalars(
            update(Task)
            .where(Task.execution_id == execution_id, Task.status == OPEN)
            .values(
                status=CANCELLED,
                decided_at=now,
                decision={"decision": None, "cancelled": True, "reason": reason},
            )
            .returning(Task)
        )
    ).all()
    for task in rows:
        people.publish_to_workspace_after_commit(
            uow, task.workspace_id, {"type": "task.cancelled", "task": brief(task)}
        )
    return len(rows)


# One-time links ------------------------------------------------------------------------------


async def link_task(
    uow: UnitOfWork, settings: Settings, token: str, *, lock: bool = False
) -> tuple[Task, ActionLink]:
    """The task a decision link is for, after checking the link's signature (a link
    that is unknown, altered, used or expired is refused; nothing says which)."""
    try:
        link_id, mac = links.decide_link_id(token)
    except links.BadLink:
        raise NotFound("this link is not valid") from None
    link = await uow.session.get(
        ActionLink, link_id, with_for_update=lock or None, populate_existing=True
    )
    if (
        link is None
        or link.purpose != "decide"
        or link.task_id is None
        or link.user_id is None
        or link.expires_at is None
    ):
        raise NotFound("this link is not valid")
    try:
        links.check_decide(settings, mac, link.id, link.task_id, link.user_id, link.expires_at)
    except links.BadLink:
        raise NotFound("this link is not valid") from None
    if link.used_at is not None:
        raise Conflict("this link was already used", field="token")
    if link.expires_at <= _now():
        raise Conflict("this link has expired", field="token")
    task = await uow.session.get(Task, link.task_id)
    if task is None:
        raise NotFound("this link is not valid")
    return task, link


async def decide_by_link(
    uow: UnitOfWork,
    settings: Settings,
    token: str,
    *,
    approve: bool,
    comment: str | None,
    value: Any,
) -> Task:
    """Decide as the person the link was sent to, if they still may (still a member,
    still allowed by the task); the link is spent with the decision."""
    task, link = await link_task(uow, settings, token, lock=True)
    assert link.user_id is not None
    user = await uow.session.get(User, link.user_id)
    role = await uow.session.scalar(
        select(WorkspaceMember.role).where(
            WorkspaceMember.workspace_id == task.workspace_id,
            WorkspaceMember.user_id == link.user_id,
        )
    )
    if user is None or not user.is_active or role is None:
        raise NotFound("this link is not valid")
    decided = await decide(
        uow,
        settings,
        task.id,
        user=user,
        role=Role(role),
        approve=approve,
        comment=comment,
        value=value,
        via="link",
    )
    link.used_at = _now()
    await uow.session.flush()
    return decided


async def resume(uow: UnitOfWork, settings: Settings, token: str, body: Any) -> links.ResumeTarget:
    """A wait step's resume URL, called: recorded once (with its body) and the run
    woken. A second call, or a call after the run ended, is refused and changes
    nothing."""
    try:
        target = links.read_resume_token(settings, token)
    except links.BadLink:
        raise NotFound("this link is not valid") from None
    if not await lifecycle.wake(
        uow, target.execution_id, actor="resume_url", reason=f"{target.node_id} resumed"
    ):
        raise Conflict("the run this link resumes has ended", field="token")
    now = _now()
    stmt = insert(ActionLink).values(
        id=uuid.uuid4(),
        purpose="resume",
        execution_id=target.execution_id,
        node_id=target.node_id,
        iteration=target.iteration,
        used_at=now,
        body=body,
    )
    used = await uow.session.scalar(
        stmt.on_conflict_do_update(
            index_elements=[
                ActionLink.execution_id,
                ActionLink.node_id,
                ActionLink.iteration,
                ActionLink.purpose,
            ],
            set_={"used_at": now, "body": stmt.excluded.body, "updated_at": func.now()},
            where=ActionLink.used_at.is_(None),
        ).returning(ActionLink.id)
    )
    if used is None:
        raise Conflict("this link was already used", field="token")
    log.info("execution.resume_url", execution_id=str(target.execution_id), node=target.node_id)
    return target
