"""Approval and wait steps through the runner (as a worker runs it, on committed data)
and the API (in-process, on the same committed data): a step parks its run holding no
slot, a decision or a resume wakes it, expiry takes `on_timeout`, cancel closes the
task, a resume URL works once."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.permissions import Role
from backend.config import Settings
from backend.executions import lifecycle
from backend.kit.db import UnitOfWork
from backend.models import ActionLink, Task, WorkflowExecution, Workspace
from backend.workflows.graph import Context, GraphInvalid, validate
from tests.support.asgi import client_for
from tests.support.engine import Enqueued, start, state
from tests.support.identity import Actor, member
from workers.engine.runner import Runner

FORM = {
    "type": "object",
    "properties": {"amount": {"type": "integer", "minimum": 1}},
    "required": ["amount"],
    "additionalProperties": False,
}


def approval_flow(**approval: Any) -> dict[str, Any]:
    config = {
        "kind": "approval",
        "title": "Pay {{ trigger.vendor }}?",
        "message": "Invoice {{ trigger.invoice }}",
        "data": {"vendor": "{{ trigger.vendor }}"},
        **approval,
    }
    return {
        "nodes": [
            {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
            {"id": "ask", "type": "logic", "config": config},
            {"id": "paid", "type": "logic",
             "config": {"kind": "transform", "template": "{{ nodes.ask.output.input | tojson }}"}},
            {"id": "refused", "type": "logic",
             "config": {"kind": "transform", "template": "no"}},
        ],
        "connections": [
            {"source": "start", "target": "ask"},
            {"source": "ask", "target": "paid", "branch": "approved"},
            {"source": "ask", "target": "refused", "branch": "rejected"},
        ],
    }  # fmt: skip


@pytest.fixture
async def api(
    settings: Settings, maker: async_sessionmaker[AsyncSession]
) -> AsyncIterator[httpx.AsyncClient]:
    from backend.main import create_app

    async for c in client_for(create_app(settings), maker):
        yield c


async def person(
    maker: async_sessionmaker[AsyncSession], settings: Settings, ws: Workspace, role: Role
) -> Actor:
    async with UnitOfWork(maker) as uow:
        actor = await member(uow.session, settings, ws, role)
    actor.headers["X-Workspace-ID"] = str(ws.id)
    return actor


async def finish(runner: Runner, maker: async_sessionmaker[AsyncSession], run: uuid.UUID) -> str:
    """Run it here until it ends (a session Celery worker may take it instead: then
    wait for that one)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        await runner.execute(run)
        ex, _ = await state(maker, run)
        if ex.status in ("completed", "failed", "cancelled"):
            return ex.status
        await asyncio.sleep(0.1)
    raise AssertionError("the run did not end")


async def task_of(maker: async_sessionmaker[AsyncSession], run: uuid.UUID) -> Task:
    async with maker() as session:
        task = await session.scalar(select(Task).where(Task.execution_id == run))
        assert task is not None
        return task


async def test_an_approval_parks_and_an_allowed_decision_with_input_finishes_the_run(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    settings: Settings,
    workspace: Workspace,
    api: httpx.AsyncClient,
) -> None:
    boss = await person(maker, settings, workspace, Role.VIEWER)
    editor = await person(maker, settings, workspace, Role.EDITOR)
    flow = approval_flow(form=FORM, assignees=[str(boss.user.id)], notify=False)
    run = await start(maker, workspace, flow, {"vendor": "Acme", "invoice": "42"})
    assert await runner.execute(run) == "parked"
    ex, nodes = await state(maker, run)
    # Parked: pending, no lease (no worker holds it), woken only by a decision.
    assert (ex.status, ex.lease_owner, ex.resume_at) == ("pending", None, lifecycle.FOREVER)
    assert nodes["ask"].status == "waiting" and "paid" not in nodes
    assert isinstance(runner.enqueue, Enqueued) and runner.enqueue == []
    task = await task_of(maker, run)
    assert (task.title, task.message, task.data) == ("Pay Acme?", "Invoice 42", {"vendor": "Acme"})
    assert nodes["ask"].output == {"task_id": str(task.id), "status": "open"}

    # The inbox: the assignee sees it as theirs, an editor not (assignees named).
    mine = (await api.get("/api/v1/tasks?assigned_to=me&status=open", headers=boss.headers)).json()
    assert [t["id"] for t in mine["items"]] == [str(task.id)] and mine["items"][0]["can_decide"]
    theirs = (await api.get("/api/v1/tasks?assigned_to=me", headers=editor.headers)).json()
    assert theirs["total"] == 0
    shown = (await api.get(f"/api/v1/tasks/{task.id}", headers=boss.headers)).json()
    assert shown["execution_id"] == str(run) and shown["node_id"] == "ask"

    url = f"/api/v1/tasks/{task.id}/approve"
    r = await api.post(url, headers=editor.headers, json={"input": {"amount": 5}})
    assert r.status_code == 403, r.text
    r = await api.post(url, headers=boss.headers, json={"input": {"amount": 0}})
    assert r.status_code == 422 and r.json()["field"] == "input.amount", r.text
    r = await api.post(url, headers=boss.headers, json={"input": {"amount": 7}, "comment": "ok"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "approved" and r.json()["decision"]["input"] == {"amount": 7}
    # Once: a second decision gets 409 with the first.
    again = await api.post(f"/api/v1/tasks/{task.id}/reject", headers=boss.headers)
    assert again.status_code == 409
    assert again.json()["decision"]["decision"] == "approved"

    assert await finish(runner, maker, run) == "completed"
    ex, nodes = await state(maker, run)
    assert nodes["ask"].status == "completed" and nodes["ask"].branch == "approved"
    output = nodes["ask"].output
    assert output["input"] == {"amount": 7} and output["comment"] == "ok"
    assert output["decided_by"] == str(boss.user.id) and output["via"] == "api"
    assert nodes["paid"].output == {"amount": 7} and nodes["refused"].status == "skipped"


async def test_an_expired_approval_takes_its_on_timeout_branch(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace
) -> None:
    run = await start(maker, workspace, approval_flow(expires_in=1, notify=False), {})
    assert await runner.execute(run) == "parked"
    assert isinstance(runner.enqueue, Enqueued)
    ((queued, countdown),) = runner.enqueue
    assert queued == run and 0 < countdown <= 1.01  # due at the task's expiry
    await asyncio.sleep(1.1)
    assert await finish(runner, maker, run) == "completed"
    _, nodes = await state(maker, run)
    assert nodes["ask"].branch == "rejected" and nodes["ask"].output["expired"] is True
    assert nodes["refused"].status == "completed" and nodes["paid"].status == "skipped"
    assert (await task_of(maker, run)).status == "expired"


async def test_on_timeout_fail_fails_the_step_and_the_run_failure_reaches_its_watchers(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    settings: Settings,
    workspace: Workspace,
    api: httpx.AsyncClient,
) -> None:
    watcher = await person(maker, settings, workspace, Role.VIEWER)
    run = await start(
        maker, workspace, approval_flow(expires_in=1, on_timeout="fail", notify=False), {}
    )
    ex, _ = await state(maker, run)
    r = await api.put(f"/api/v1/notifications/watches/{ex.workflow_id}", headers=watcher.headers)
    assert r.status_code == 204, r.text
    assert await runner.execute(run) == "parked"
    await asyncio.sleep(1.1)
    assert await finish(runner, maker, run) == "failed"
    _, nodes = await state(maker, run)
    assert nodes["ask"].status == "failed"
    assert "expired" in (nodes["ask"].error or {}).get("message", "")
    notes = (await api.get("/api/v1/notifications", headers=watcher.headers)).json()
    assert [(n["kind"], n["data"]["execution_id"]) for n in notes["items"]] == [
        ("run.failed", str(run))
    ]


async def test_cancelling_a_parked_run_cancels_its_task_and_node(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    settings: Settings,
    workspace: Workspace,
    api: httpx.AsyncClient,
) -> None:
    owner = await person(maker, settings, workspace, Role.OWNER)
    run = await start(maker, workspace, approval_flow(notify=False), {})
    assert await runner.execute(run) == "parked"
    r = await api.post(f"/api/v1/executions/{run}/cancel", headers=owner.headers)
    assert r.status_code in (200, 202), r.text
    ex, nodes = await state(maker, run)
    assert ex.status == "cancelled" and nodes["ask"].status == "cancelled"
    task = await task_of(maker, run)
    assert task.status == "cancelled"
    r = await api.post(f"/api/v1/tasks/{task.id}/approve", headers=owner.headers)
    assert r.status_code == 409 and r.json()["task_status"] == "cancelled"


async def test_a_wait_for_a_duration_parks_with_a_countdown(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace
) -> None:
    flow = {
        "nodes": [
            {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
            {"id": "pause", "type": "logic", "config": {"kind": "wait", "duration_s": 0.5}},
        ],
        "connections": [{"source": "start", "target": "pause"}],
    }
    run = await start(maker, workspace, flow, {})
    assert await runner.execute(run) == "parked"
    assert isinstance(runner.enqueue, Enqueued)
    assert 0 < runner.enqueue[0][1] <= 0.5
    # Due later, not yet: a message arriving early claims nothing.
    assert await runner.execute(run) == "not_claimed"
    await asyncio.sleep(0.6)
    assert await finish(runner, maker, run) == "completed"
    _, nodes = await state(maker, run)
    assert nodes["pause"].output["waited_s"] >= 0.5


async def test_a_resume_url_resumes_once_with_its_body(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    api: httpx.AsyncClient,
) -> None:
    flow = {
        "nodes": [
            {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
            # The URL is known before the wait runs: a node upstream hands it out.
            {"id": "announce", "type": "logic",
             "config": {"kind": "transform", "template": "{{ execution.resume_urls.hold }}"}},
            {"id": "hold", "type": "logic", "config": {"kind": "wait", "resume_url": True}},
            {"id": "after", "type": "logic",
             "config": {"kind": "transform", "template": "{{ nodes.hold.output.body.ok }}"}},
        ],
        "connections": [
            {"source": "start", "target": "announce"},
            {"source": "announce", "target": "hold"},
            {"source": "hold", "target": "after", "branch": "resumed"},
        ],
    }  # fmt: skip
    run = await start(maker, workspace, flow, {})
    assert await runner.execute(run) == "parked"
    _, nodes = await state(maker, run)
    url = nodes["announce"].output
    assert isinstance(url, str) and nodes["hold"].output["resume_url"] == url
    path = "/api/v1/resume/" + url.rsplit("/", 1)[1]
    forged = path[:-3] + ("AAA" if not path.endswith("AAA") else "BBB")
    assert (await api.post(forged, json={})).status_code == 404
    # Over its own cap (TASKS__RESUME_MAX_BODY_BYTES): 413, and the URL is not spent.
    big = {"ok": "x" * 300_000}
    r = await api.post(path, json=big)
    assert (r.status_code, r.json()["error"]) == (413, "payload_too_large"), r.text
    r = await api.post(path, json={"ok": "yes"})
    assert r.status_code == 202, r.text
    second = await api.post(path, json={"ok": "again"})
    assert second.status_code == 409
    assert await finish(runner, maker, run) == "completed"
    _, nodes = await state(maker, run)
    assert nodes["hold"].branch == "resumed" and nodes["hold"].output["body"] == {"ok": "yes"}
    assert nodes["after"].output == "yes"
    # The run has ended: the URL stays spent.
    assert (await api.post(path)).status_code == 409
    async with maker() as session:
        links = (
            await session.scalars(select(ActionLink).where(ActionLink.execution_id == run))
        ).all()
    assert len(links) == 1 and links[0].used_at is not None


async def test_a_manual_task_and_the_inbox_rules(
    maker: async_sessionmaker[AsyncSession],
    settings: Settings,
    workspace: Workspace,
    api: httpx.AsyncClient,
) -> None:
    editor = await person(maker, settings, workspace, Role.EDITOR)
    viewer = await person(maker, settings, workspace, Role.VIEWER)
    admin = await person(maker, settings, workspace, Role.ADMINISTRATOR)
    body = {"title": "Review the contract", "min_role": "administrator", "form": FORM}
    r = await api.post("/api/v1/tasks", headers=viewer.headers, json=body)
    assert r.status_code == 403
    r = await api.post("/api/v1/tasks", headers=editor.headers, json={**body, "form": {"type": 3}})
    assert r.status_code == 422 and r.json()["fields"][0]["field"] == "form", r.text
    # A remote $ref is never fetched (no request from our network on a form's say-so).
    remote = {"type": "object", "properties": {"a": {"$ref": "http://10.255.255.1/x.json"}}}
    r = await api.post("/api/v1/tasks", headers=editor.headers, json={**body, "form": remote})
    assert r.status_code == 422 and "Retrieval is disabled" in r.text, r.text
    stranger = str(uuid.uuid4())
    r = await api.post(
        "/api/v1/tasks", headers=editor.headers, json={**body, "assignees": [stranger]}
    )
    assert r.status_code == 422 and r.json()["field"] == "assignees[0]"
    r = await api.post("/api/v1/tasks", headers=editor.headers, json=body)
    assert r.status_code == 201, r.text
    task = r.json()
    assert task["execution_id"] is None and task["status"] == "open" and not task["can_decide"]
    tid = task["id"]
    assert (await api.post(f"/api/v1/tasks/{tid}/claim", headers=editor.headers)).status_code == 403
    r = await api.post(f"/api/v1/tasks/{tid}/claim", headers=admin.headers)
    assert r.status_code == 200 and r.json()["claimed_by"] == str(admin.user.id)
    r = await api.post(
        f"/api/v1/tasks/{tid}/reject", headers=admin.headers, json={"input": {"amount": 2}}
    )
    assert r.status_code == 200 and r.json()["status"] == "rejected"
    listed = (await api.get("/api/v1/tasks?status=rejected", headers=viewer.headers)).json()
    assert tid in [t["id"] for t in listed["items"]]
    r = await api.get("/api/v1/tasks?status=bogus", headers=viewer.headers)
    assert r.status_code == 422
    # The form is what approving needs; saying no needs none.
    tid = (await api.post("/api/v1/tasks", headers=editor.headers, json=body)).json()["id"]
    r = await api.post(f"/api/v1/tasks/{tid}/approve", headers=admin.headers, json={})
    assert (r.status_code, r.json()["field"]) == (422, "input"), r.text
    r = await api.post(f"/api/v1/tasks/{tid}/reject", headers=admin.headers, json={"comment": "no"})
    assert (r.status_code, r.json()["status"]) == (200, "rejected"), r.text


def test_approval_and_wait_schemas_refuse_what_cannot_work() -> None:
    def check(config: dict[str, Any]) -> list[str]:
        try:
            validate(
                {"nodes": [{"id": "t", "type": "trigger", "config": {"kind": "manual"}},
                           {"id": "s", "type": "logic", "config": config}],
                 "connections": [{"source": "t", "target": "s"}]},
                Context(),
            )  # fmt: skip
        except GraphInvalid as exc:
            return [str(p.field) for p in exc.problems]
        return []

    assert check({"kind": "approval", "title": "x", "form": {"type": "nope"}}) == ["config.form"]
    assert check({"kind": "approval", "title": "x", "on_timeout": "maybe"}) == ["config.on_timeout"]
    assert check({"kind": "wait"}) == ["config.duration_s"]
    assert check({"kind": "wait", "duration_s": 1, "resume_url": True}) == ["config.duration_s"]
    assert check({"kind": "wait", "duration_s": 1, "timeout_s": 5}) == ["config.timeout_s"]
    assert check({"kind": "approval", "title": "{{ nodes.later.output }}"}) == ["config.title"]
    assert check({"kind": "wait", "until": "{{ trigger.when }}"}) == []
    in_loop = {
        "kind": "for_each",
        "items": "trigger.items",
        "body": {"nodes": [{"id": "a", "type": "logic",
                            "config": {"kind": "approval", "title": "x"}}]},
    }  # fmt: skip
    assert "config.body.a" in check(in_loop)


async def test_a_retry_reuses_a_decision_instead_of_opening_a_new_task(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    settings: Settings,
    workspace: Workspace,
    api: httpx.AsyncClient,
) -> None:
    owner = await person(maker, settings, workspace, Role.OWNER)
    run = await start(maker, workspace, approval_flow(notify=False), {})
    assert await runner.execute(run) == "parked"
    # Decided, but the run was cancelled before it resumed to read the decision.
    decision = {"decision": "approved", "input": None, "comment": "earlier", "via": "api"}
    async with UnitOfWork(maker) as uow:
        await uow.session.execute(
            update(Task)
            .where(Task.execution_id == run)
            .values(status="approved", decision=decision, decided_at=func.now())
        )
        ex = await uow.session.get(WorkflowExecution, run, with_for_update=True)
        assert ex is not None
        await lifecycle.cancel_tree(uow, ex, datetime.now(UTC), actor="test")
    assert (await task_of(maker, run)).status == "approved"  # a cancel keeps decisions
    r = await api.post(f"/api/v1/executions/{run}/retry", headers=owner.headers)
    assert r.status_code == 202, r.text
    retry = uuid.UUID(r.json()["id"])
    assert await finish(runner, maker, retry) == "completed"
    _, nodes = await state(maker, retry)
    assert nodes["ask"].branch == "approved" and nodes["ask"].output["comment"] == "earlier"
    async with maker() as session:
        opened = await session.scalar(
            select(func.count()).select_from(Task).where(Task.execution_id == retry)
        )
    assert opened == 0
