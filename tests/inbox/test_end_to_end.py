"""Issue 16's "done when", through a real uvicorn and a real Celery worker: a run reaches
an approval and parks (a second run completes meanwhile: no slot held), the assignee
sees the task in the inbox and a decrypted web push, approves with form input, and the
run completes on the `approved` branch with the input in its output; an expired task
takes its `on_timeout` branch; a wait step resumes by its URL once and only once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from typing import Any
from uuid import uuid4

import httpx
import pytest

from tests.push.loopback import PushService, push_service, vapid_keys
from tests.support.crossprocess import wait_until_done, workflow
from tests.support.definitions import chain
from tests.support.mail import Mailbox, body_of
from tests.support.procs import PYTHON, python_env

# The API and the worker are started after collection, with this environment: the
# worker signs Web Push with this VAPID key.
PRIVATE, PUBLIC = vapid_keys()
os.environ.setdefault("PUSH__VAPID_PRIVATE_KEY", PRIVATE)
os.environ.setdefault("PUSH__VAPID_PUBLIC_KEY", PUBLIC)

pytestmark = [pytest.mark.xdist_group("crossprocess"), pytest.mark.usefixtures("worker_name")]

FORM = {
    "type": "object",
    "properties": {"po": {"type": "string", "pattern": "^PO-[0-9]+$"}},
    "required": ["po"],
}


def flow(**approval: Any) -> dict[str, Any]:
    return {
        "nodes": [
            {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
            {"id": "ask", "type": "logic",
             "config": {"kind": "approval", "title": "Buy {{ trigger.item }}?", **approval}},
            {"id": "buy", "type": "logic",
             "config": {"kind": "transform", "template": "{{ nodes.ask.output.input.po }}"}},
            {"id": "skip", "type": "logic", "config": {"kind": "transform", "template": "no"}},
        ],
        "connections": [
            {"source": "start", "target": "ask"},
            {"source": "ask", "target": "buy", "branch": "approved"},
            {"source": "ask", "target": "skip", "branch": "rejected"},
        ],
    }  # fmt: skip


@pytest.fixture(scope="module")
def pushes() -> Any:
    with push_service() as s:
        yield s


def start(api: str, headers: dict[str, str], wf: str, data: dict[str, Any]) -> str:
    r = httpx.post(
        f"{api}/api/v1/executions",
        headers=headers,
        json={"workflow_id": wf, "trigger_data": data},
        timeout=10,
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def poll(check: Any, timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_a_run_parks_on_an_approval_and_the_assignee_approves_it(
    api: str, owner: dict[str, str], pushes: PushService
) -> None:
    sub = pushes.subscription("owner-browser")
    r = httpx.post(f"{api}/api/v1/notifications/push-subscriptions", headers=owner, json=sub)
    assert r.status_code == 201, r.text
    assert httpx.get(f"{api}/api/v1/notifications/push-key", headers=owner).json() == {
        "vapid_public_key": PUBLIC
    }
    wf = workflow(api, owner, flow(form=FORM))
    run = start(api, owner, wf, {"item": "a laptop"})

    def waiting() -> Any:
        # The step is checkpointed `waiting` first, then the run parks (`pending`, its
        # lease given back): a read between the two sees it still `running`.
        body = httpx.get(f"{api}/api/v1/executions/{run}", headers=owner, timeout=10).json()
        nodes = {n["node_id"]: n["status"] for n in body["nodes"]}
        parked = nodes.get("ask") == "waiting" and body["status"] == "pending"
        return body if parked else None

    parked = poll(waiting)
    assert parked["status"] == "pending" and parked["finished_at"] is None
    # No slot held: another run goes through the same one-process worker meanwhile.
    other = start(api, owner, workflow(api, owner, chain(3)), {"x": 1})
    assert wait_until_done(api, owner, other)["status"] == "completed"

    inbox = httpx.get(
        f"{api}/api/v1/tasks", headers=owner, params={"assigned_to": "me", "status": "open"}
    ).json()
    (task,) = [t for t in inbox["items"] if t["execution_id"] == run]
    assert task["title"] == "Buy a laptop?" and task["can_decide"] and task["form"] == FORM
    # The push reached the browser, decryptable only with its keys.
    poll(lambda: any(r[0] == "owner-browser" for r in pushes.received))
    (payload,) = [p for name, p, _ in pushes.received if name == "owner-browser"]
    assert payload["title"] == "Decision needed: Buy a laptop?"
    assert payload["data"]["task_id"] == task["id"]
    notes = httpx.get(f"{api}/api/v1/notifications", headers=owner).json()
    assert any(n["data"].get("task_id") == task["id"] for n in notes["items"])

    approve = f"{api}/api/v1/tasks/{task['id']}/approve"
    bad = httpx.post(approve, headers=owner, json={"input": {"po": "nope"}})
    assert bad.status_code == 422 and bad.json()["field"] == "input.po"
    ok = httpx.post(approve, headers=owner, json={"input": {"po": "PO-7"}, "comment": "go"})
    assert ok.status_code == 200, ok.text
    done = wait_until_done(api, owner, run)
    assert done["status"] == "completed", done
    assert done["output"]["buy"] == "PO-7"
    nodes = httpx.get(f"{api}/api/v1/executions/{run}/nodes", headers=owner).json()
    ask = {n["node_id"]: n for n in nodes}["ask"]
    assert ask["branch"] == "approved" and ask["output"]["input"] == {"po": "PO-7"}
    assert {n["node_id"]: n["status"] for n in nodes}["skip"] == "skipped"


def test_an_expired_task_takes_its_on_timeout_branch(api: str, owner: dict[str, str]) -> None:
    wf = workflow(api, owner, flow(expires_in=1, on_timeout="reject", notify=False))
    run = start(api, owner, wf, {"item": "a yacht"})
    done = wait_until_done(api, owner, run, timeout_s=60)
    assert done["status"] == "completed", done
    assert "skip" in done["output"] and "buy" not in done["output"]
    tasks = httpx.get(f"{api}/api/v1/tasks", headers=owner, params={"execution_id": run}).json()
    assert [t["status"] for t in tasks["items"]] == ["expired"]


def test_a_wait_step_resumes_by_its_url_once(api: str, owner: dict[str, str]) -> None:
    definition = {
        "nodes": [
            {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
            {"id": "hold", "type": "logic", "config": {"kind": "wait", "resume_url": True}},
            {"id": "after", "type": "logic",
             "config": {"kind": "transform", "template": "{{ nodes.hold.output.body.n }}"}},
        ],
        "connections": [{"source": "start", "target": "hold"},
                        {"source": "hold", "target": "after", "branch": "resumed"}],
    }  # fmt: skip
    run = start(api, owner, workflow(api, owner, definition), {})

    def resume_url() -> Any:
        nodes = httpx.get(f"{api}/api/v1/executions/{run}/nodes", headers=owner).json()
        hold = {n["node_id"]: n for n in nodes}.get("hold")
        return hold["output"]["resume_url"] if hold and hold["status"] == "waiting" else None

    url = poll(resume_url)
    token = url.rsplit("/", 1)[1]
    first = httpx.post(f"{api}/api/v1/resume/{token}", json={"n": 3})
    assert first.status_code == 202, first.text
    second = httpx.post(f"{api}/api/v1/resume/{token}", json={"n": 4})
    assert second.status_code == 409
    done = wait_until_done(api, owner, run)
    assert done["status"] == "completed" and done["output"] == {"after": 3}


def test_studio_tasks_list_approve_reject(api: str, owner: dict[str, str], tmp_path: Any) -> None:
    def studio(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-m", "studio", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=python_env(STUDIO_CONFIG_DIR=str(tmp_path), STUDIO_URL=api, **env),
        )

    made = studio(
        "admin", "create-api-key", "--workspace", owner["X-Workspace-ID"], "--role", "editor",
        "--json",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["key"]
    ids = []
    for title in ("Renew the domain", "Order chairs"):
        r = httpx.post(
            f"{api}/api/v1/tasks",
            headers=owner,
            json={"title": title, "form": FORM, "notify": False},
        )
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    listed = studio("tasks", "list", "--mine", "--json", STUDIO_API_KEY=key)
    assert listed.returncode == 0, listed.stderr
    assert set(ids) <= {t["id"] for t in json.loads(listed.stdout)["items"]}
    bad = studio("tasks", "approve", ids[0], "--input", '{"po": "x"}', STUDIO_API_KEY=key)
    assert bad.returncode != 0 and "input.po" in bad.stderr
    ok = studio(
        "tasks", "approve", ids[0], "--input", '{"po": "PO-9"}', "-m", "fine", "--json",
        STUDIO_API_KEY=key,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["decision"]["input"] == {"po": "PO-9"}
    again = studio("tasks", "reject", ids[0], STUDIO_API_KEY=key)
    assert again.returncode != 0 and "already approved" in again.stderr
    no = studio("tasks", "reject", ids[1], "--input", '{"po": "PO-1"}', STUDIO_API_KEY=key)
    assert no.returncode == 0 and "rejected" in no.stdout


async def test_task_events_arrive_on_the_workspace_and_the_users_own_channel(
    api: str, owner: dict[str, str]
) -> None:
    import asyncio

    import websockets

    url = api.replace("http://", "ws://") + "/api/v1/ws"
    token = owner["Authorization"].removeprefix("Bearer ")
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"token": token, "workspace_id": owner["X-Workspace-ID"]}))

        seen: list[dict[str, Any]] = []

        async def next_message(pred: Any) -> dict[str, Any]:
            # Channels interleave: what one wait passes over, a later one may want.
            for body in seen:
                if pred(body):
                    seen.remove(body)
                    return body
            while True:
                body = json.loads(await asyncio.wait_for(ws.recv(), 20))
                if pred(body):
                    return dict(body)
                seen.append(body)

        await ws.send(json.dumps({"action": "subscribe", "channel": "user"}))
        await next_message(lambda b: b.get("type") == "subscribed" and b["channel"] == "user")
        await ws.send(json.dumps({"action": "subscribe", "channel": "user:" + str(uuid4())}))
        refused = await next_message(lambda b: b.get("type") == "error")
        assert "your own" in refused["message"]
        await ws.send(json.dumps({"action": "subscribe", "channel": "workspace"}))
        await next_message(lambda b: b.get("type") == "subscribed")

        r = await asyncio.to_thread(
            httpx.post,
            f"{api}/api/v1/tasks",
            headers=owner,
            json={"title": "Sign the lease", "notify": True},
        )
        assert r.status_code == 201, r.text
        tid = r.json()["id"]

        def about(channel: str, kind: str) -> Any:
            return lambda b: (
                b.get("channel") == channel
                and b.get("event", {}).get("type") == kind
                and (b["event"].get("task") or b["event"].get("notification", {}).get("data", {}))
                and tid in json.dumps(b["event"])
            )

        await next_message(about("user", "task.created"))
        await next_message(about("workspace", "task.created"))
        note = await next_message(about("user", "notification.created"))
        assert note["event"]["notification"]["kind"] == "task.assigned"
        await asyncio.to_thread(
            httpx.post, f"{api}/api/v1/tasks/{tid}/approve", headers=owner, json={}
        )
        decided = await next_message(about("user", "task.decided"))
        assert decided["event"]["task"]["status"] == "approved"


def test_the_emailed_links_show_the_task_and_decide_it_once(
    api: str, owner: dict[str, str], mailbox: Mailbox
) -> None:
    """The assignee's e-mail carries one-time links: opening one never decides (mail
    scanners open links), the page's button does, once. A task whose form needs input
    offers no Approve on the page (it has no form), and rejecting needs no input."""
    me = httpx.get(f"{api}/api/v1/auth/me", headers=owner).json()

    def links_for(form: dict[str, Any] | None) -> tuple[str, dict[str, str]]:
        before = mailbox.count()
        body = {"title": f"Sign off {uuid4().hex[:6]}", "assignees": [me["id"]]}
        r = httpx.post(f"{api}/api/v1/tasks", headers=owner, json={**body, "form": form})
        assert r.status_code == 201, r.text
        text = body_of(mailbox.wait_for(me["email"], after=before))
        found = dict(re.findall(r"(Approve|Reject):\s+\S+(/api/v1/task-links/\S+)", text))
        assert set(found) == {"Approve", "Reject"}, text
        return r.json()["id"], {k.lower(): f"{api}{v}" for k, v in found.items()}

    task_id, links = links_for(None)
    page = httpx.get(links["approve"])
    assert page.status_code == 200 and "<button" in page.text and "Approve" in page.text
    assert httpx.get(f"{api}/api/v1/tasks/{task_id}", headers=owner).json()["status"] == "open"
    decided = httpx.post(links["approve"].split("?")[0], data={"decision": "approve"})
    assert (decided.status_code, decided.json()["status"]) == (200, "approved"), decided.text
    again = httpx.post(links["reject"].split("?")[0], data={"decision": "reject"})
    assert again.status_code in (404, 409), again.text
    assert httpx.get(f"{api}/api/v1/tasks/{task_id}", headers=owner).json()["status"] == "approved"

    task_id, links = links_for(FORM)
    page = httpx.get(links["approve"].split("?")[0])
    assert "Approving needs the task" in page.text and ">Approve<" not in page.text
    refused = httpx.post(links["approve"].split("?")[0], data={"decision": "approve"})
    assert (refused.status_code, refused.json()["field"]) == (422, "input")
    decided = httpx.post(links["reject"].split("?")[0], data={"decision": "reject"})
    assert (decided.status_code, decided.json()["status"]) == (200, "rejected"), decided.text
