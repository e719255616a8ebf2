"""A node's templates stop at its deadline (they run in the event loop, where nothing
else can interrupt them), and its outbound HTTP calls carry an idempotency key that is
the same every time the same node execution is sent."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from backend.config import Settings
from backend.kit.http_guard import guarded_client
from backend.workflows.graph import HttpRequestAction, Node, WhileLogic
from tests.nodes.conftest import Receiver
from workers.engine.retry import NodeFailure
from workers.nodes import action, logic
from workers.nodes.base import NodeContext

HEAVY = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
EXECUTION = uuid.uuid4()


@pytest.fixture
def local(settings: Settings) -> Settings:
    http = settings.http.model_copy(update={"allow_private_networks": ["127.0.0.1/32"]})
    return settings.model_copy(update={"http": http})


@pytest.fixture
async def http() -> AsyncIterator[Any]:
    async with guarded_client(["127.0.0.1/32"]) as client:
        yield client


def context(
    settings: Settings,
    http: Any,
    config: Any,
    *,
    node_id: str = "n",
    deadline: float | None = None,
    scope: dict[str, Any] | None = None,
    **fields: Any,
) -> NodeContext:
    ctx = NodeContext(
        node=Node(id=node_id, type="action", config={}),
        config=config,
        execution_id=EXECUTION,
        workspace_id=uuid.uuid4(),
        settings=settings,
        scope={"trigger": {}, "nodes": {}, "vars": {}, "execution": {}, **(scope or {})},
        http=http,
        sessionmaker=None,  # type: ignore[arg-type]
        deadline=deadline,
    )
    for name, value in fields.items():
        setattr(ctx, name, value)
    return ctx


# Deadline ---------------------------------------------------------------------------------


async def test_a_node_deadline_stops_a_heavy_template_permanently(
    local: Settings, http: Any
) -> None:
    ctx = context(local, http, None, deadline=time.monotonic() + 0.3)
    started = time.monotonic()
    with pytest.raises(NodeFailure) as info:
        ctx.render(HEAVY)
    assert time.monotonic() - started < 1.0
    assert info.value.error_class == "permanent"
    assert "time limit" in str(info.value)


async def test_without_a_deadline_a_render_still_stops_at_its_own_budget(
    local: Settings, http: Any
) -> None:
    ctx = context(local, http, None)
    started = time.monotonic()
    with pytest.raises(NodeFailure, match="longer than 1 s"):
        ctx.render(HEAVY)
    assert time.monotonic() - started < 1.5


async def test_a_size_limit_is_a_permanent_failure_naming_the_limit(
    local: Settings, http: Any
) -> None:
    ctx = context(local, http, None, deadline=time.monotonic() + 5)
    with pytest.raises(NodeFailure, match="more than 1000000 characters") as info:
        ctx.render("{{ '{:>100000000}'.format(1) }}")
    assert info.value.error_class == "permanent"
    with pytest.raises(NodeFailure, match="more than 4096 bits"):
        ctx.evaluate("2 ** 100000 > 0")


async def test_a_while_condition_stops_at_the_node_deadline(local: Settings, http: Any) -> None:
    config = WhileLogic.model_construct(
        kind="while",
        condition="range(100000)|map('string')|map('upper')|list|length > 0",
        max_iterations=1000,
    )

    async def body(index: int, scope: dict[str, Any]) -> Any:
        return index

    ctx = context(local, http, config, deadline=time.monotonic() + 0.2, run_body=body)
    started = time.monotonic()
    with pytest.raises(NodeFailure, match=r"condition stopped: .*time limit"):
        await logic.run(ctx)
    assert time.monotonic() - started < 1.0


# Idempotency key --------------------------------------------------------------------------


def post(receiver: Receiver, **config: Any) -> HttpRequestAction:
    return HttpRequestAction(
        kind="http_request", method="POST", url=f"{receiver.base}/ok", **config
    )


async def test_outbound_requests_carry_a_key_stable_across_reruns(
    local: Settings, http: Any, receiver: Receiver
) -> None:
    config = post(receiver, body='{"a": 1}')
    # The first attempt, a retry, and the same node run again after a crash.
    await action.run(context(local, http, config))
    await action.run(context(local, http, config, attempt=2))
    await action.run(context(local, http, config))
    keys = [d.headers["Idempotency-Key"] for d in receiver.to("ok")]
    assert len(keys) == 3
    assert len(set(keys)) == 1
    assert keys[0] == f"{EXECUTION}:n:0"


async def test_the_key_differs_per_node_and_per_loop_pass(
    local: Settings, http: Any, receiver: Receiver
) -> None:
    config = post(receiver)
    await action.run(context(local, http, config, node_id="a"))
    await action.run(context(local, http, config, node_id="b"))
    await action.run(context(local, http, config, scope={"index": 1}))
    await action.run(context(local, http, config, scope={"iteration": 2}))
    await action.run(context(local, http, config, key="each.n", iteration=3))
    keys = [d.headers["Idempotency-Key"] for d in receiver.to("ok")]
    assert keys == [
        f"{EXECUTION}:a:0",
        f"{EXECUTION}:b:0",
        f"{EXECUTION}:n:1",
        f"{EXECUTION}:n:2",
        f"{EXECUTION}:each.n:3",
    ]


async def test_a_key_the_user_set_is_sent_as_it_is(
    local: Settings, http: Any, receiver: Receiver
) -> None:
    config = post(receiver, headers={"idempotency-key": "mine-{{ 1 + 1 }}"})
    await action.run(context(local, http, config))
    (delivery,) = receiver.to("ok")
    sent = {k.lower(): v for k, v in delivery.headers.items()}
    assert sent["idempotency-key"] == "mine-2"
    assert sum(1 for k in delivery.headers if k.lower() == "idempotency-key") == 1
