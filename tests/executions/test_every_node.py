"""One workflow with every node type the engine runs, through a real uvicorn and a real
Celery worker, against local servers (HTTP target, Messages API, SMTP): it completes
with the expected output of every node, and the untaken branches are skipped."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.crossprocess import wait_until_done, workflow
from tests.support.mail import Mailbox, body_of
from tests.support.target import Target, http_target

pytestmark = [pytest.mark.xdist_group("crossprocess"), pytest.mark.usefixtures("worker_name")]


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    with http_target() as t:
        yield t


def node(node_id: str, type_: str, **config: Any) -> dict[str, Any]:
    return {"id": node_id, "type": type_, "config": config}


def every_node(target: Target, child: str, to: str) -> dict[str, Any]:
    nodes = [
        node("start", "trigger", kind="manual"),
        node("greet", "logic", kind="set", variables={"greeting": "hello {{ trigger.name }}"}),
        node("fetch", "action", kind="http_request", url=f"{target.base}/ok"),
        node("check", "logic", kind="if", condition="nodes.fetch.output.status == 200"),
        node("never", "logic", kind="transform", template="unreachable"),
        node(
            "route",
            "logic",
            kind="switch",
            cases=[{"when": "trigger.plan == 'pro'", "branch": "pro"}],
        ),
        node("basic", "logic", kind="transform", template="basic"),
        node("think", "agent", model="claude-sonnet-5-5", prompt="{{ vars.greeting }}"),
        node(
            "save",
            "action",
            kind="file_write",
            path="runs/{{ execution.id }}.txt",
            content="{{ nodes.think.output.text }}",
        ),
        node("load", "action", kind="file_read", path="runs/{{ execution.id }}.txt"),
        node(
            "double",
            "logic",
            kind="for_each",
            items="[1, 2, 3]",
            body={"nodes": [node("x2", "logic", kind="transform", template="{{ item * 2 }}")]},
        ),
        node(
            "count",
            "logic",
            kind="while",
            condition="iteration < 3",
            max_iterations=5,
            body={
                "nodes": [node("inc", "logic", kind="transform", template="{{ (last or 0) + 10 }}")]
            },
        ),
        node(
            "child",
            "integration",
            kind="sub_workflow",
            workflow_id=child,
            input={"n": "{{ nodes.count.output.last }}"},
        ),
        node(
            "tell",
            "action",
            kind="notify",
            channel="email",
            to=to,
            subject="run",
            message="child said {{ nodes.child.output.times }}",
        ),
        node("join", "logic", kind="merge"),
        node(
            "result",
            "logic",
            kind="transform",
            template=(
                '{"text": {{ nodes.load.output.content | tojson }},'
                ' "doubled": {{ nodes.double.output | tojson }},'
                ' "child": {{ nodes.child.output.times }}}'
            ),
        ),
    ]
    edges = [
        ("start", "greet", None), ("greet", "fetch", None), ("fetch", "check", None),
        ("check", "never", "false"), ("check", "route", "true"),
        ("route", "think", "pro"), ("route", "basic", "default"),
        ("think", "save", None), ("save", "load", None), ("load", "double", None),
        ("double", "count", None), ("count", "child", None), ("child", "tell", None),
        ("tell", "join", None), ("never", "join", None), ("join", "result", None),
    ]  # fmt: skip
    connections = [{"source": s, "target": t, **({"branch": b} if b else {})} for s, t, b in edges]
    return {"nodes": nodes, "connections": connections}


def test_a_workflow_with_every_node_type_completes_with_the_expected_outputs(
    api: str, owner: dict[str, str], target: Target, mailbox: Mailbox
) -> None:
    child = workflow(
        api,
        owner,
        {
            "nodes": [
                node("start", "trigger", kind="manual"),
                node("times", "logic", kind="transform", template="{{ trigger.n * 2 }}"),
            ],
            "connections": [{"source": "start", "target": "times"}],
        },
    )
    to = f"ops-{uuid.uuid4().hex[:6]}@example.com"
    wf = workflow(api, owner, every_node(target, child, to))
    before = mailbox.count()
    r = httpx.post(
        f"{api}/api/v1/executions",
        headers=owner,
        json={"workflow_id": wf, "trigger_data": {"name": "Ada", "plan": "pro"}},
        timeout=10,
    )
    assert r.status_code == 202, r.text
    run = wait_until_done(api, owner, r.json()["id"], timeout_s=60)
    assert run["status"] == "completed", run["error"]
    nodes = {
        n["node_id"]: n
        for n in httpx.get(
            f"{api}/api/v1/executions/{run['id']}/nodes", headers=owner, timeout=10
        ).json()
        if n["iteration"] == 0
    }
    status = {k: v["status"] for k, v in nodes.items()}
    assert status.pop("never") == status.pop("basic") == "skipped"
    assert set(status.values()) == {"completed"}, status
    out = {k: v["output"] for k, v in nodes.items()}
    assert out["greet"] == {"greeting": "hello Ada"}
    assert out["fetch"]["status"] == 200
    assert out["check"] == {"result": True}
    assert out["route"] == {"branch": "pro"}
    assert out["think"]["text"] == "echo: hello Ada"
    assert out["load"]["content"] == "echo: hello Ada"
    assert out["double"] == [2, 4, 6]
    assert out["count"] == {"iterations": 3, "last": 30}
    assert out["child"] == {"times": 60}
    assert out["result"] == {"text": "echo: hello Ada", "doubled": [2, 4, 6], "child": 60}
    assert run["output"] == {"result": out["result"]}
    # The agent's tokens and cost are on the run.
    assert run["input_tokens"] > 0 and run["cost_usd"] > 0
    msg = mailbox.wait_for(to, after=before, timeout_s=10)
    assert "child said 60" in body_of(msg)
    children = httpx.get(
        f"{api}/api/v1/executions",
        headers=owner,
        params={"workflow_id": child},
        timeout=10,
    ).json()
    assert children["total"] == 1
    assert children["items"][0]["status"] == "completed"
