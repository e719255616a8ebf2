"""backend.n8n.client against the loopback stand-in: cursor pages to the end, publish
with the 1.x fallback, retries on 429/5xx (a POST is not sent again after a 500), clear
failures for a wrong key, a refused address and a redirect; and the typed shapes match
n8n's shipped spec."""

from __future__ import annotations

from typing import get_type_hints

import pytest

from backend.config import Settings
from backend.n8n import client as n8n
from backend.n8n.api_types import Execution, Workflow
from tests.n8n import spec
from tests.n8n.standin import StandIn


def make(local: Settings, standin: StandIn, key: str | None = None) -> n8n.N8nClient:
    return n8n.client_for(local, standin.base, key or standin.api_key)


def test_typed_keys_are_properties_of_the_spec() -> None:
    workflow = spec.properties("/workflows/{workflowId}", "get", 200)
    assert set(get_type_hints(Workflow)) <= workflow
    listed = spec.properties("/executions", "get", 200, "data", "items")
    single = spec.properties("/executions/{executionId}", "get", 200)
    assert set(get_type_hints(Execution)) - {"data"} <= listed
    assert "data" in single


async def test_lists_follow_next_cursor_to_the_end(local: Settings, standin: StandIn) -> None:
    for i in range(5):
        standin.add_workflow(f"w{i}", active=i % 2 == 0)
    async with make(local, standin) as api:
        found = await api.workflows()
        active = await api.workflows(active=True)
    assert sorted(w["name"] for w in found) == [f"w{i}" for i in range(5)]
    assert sorted(w["name"] for w in active) == ["w0", "w2", "w4"]
    # page_size 2: three pages, each after the first naming the previous nextCursor.
    pages = [c for c in standin.calls if c.path == "/api/v1/workflows"][:3]
    assert [("cursor" in c.query) for c in pages] == [False, True, True]
    assert all(c.query["excludePinnedData"] == "true" for c in pages)


async def test_publish_and_unpublish_on_2x_and_the_1x_fallback(
    local: Settings, standin: StandIn
) -> None:
    wf = standin.add_workflow("flow")
    async with make(local, standin) as api:
        assert (await api.publish(wf["id"]))["active"] is True
        assert api.legacy_publish is False
        assert (await api.unpublish(wf["id"]))["active"] is False
    assert [c.path.rsplit("/", 1)[1] for c in standin.calls if c.method == "POST"] == [
        "publish", "unpublish",
    ]  # fmt: skip
    standin.calls.clear()
    standin.version = "1.123.4"
    async with make(local, standin) as api:
        assert (await api.publish(wf["id"]))["active"] is True
        assert api.legacy_publish is True
        # Known to be 1.x now: straight to deactivate.
        assert (await api.unpublish(wf["id"]))["active"] is False
    assert [c.path.rsplit("/", 1)[1] for c in standin.calls if c.method == "POST"] == [
        "publish", "activate", "deactivate",
    ]  # fmt: skip


async def test_a_missing_workflow_is_refused_on_either_generation(
    local: Settings, standin: StandIn
) -> None:
    async with make(local, standin) as api:
        with pytest.raises(n8n.Forbidden):
            await api.publish("nope123")
    standin.version = "1.123.4"
    async with make(local, standin) as api:
        with pytest.raises(n8n.Missing):
            await api.publish("nope123")


async def test_429_and_503_are_retried_then_succeed(local: Settings, standin: StandIn) -> None:
    standin.add_workflow("flow")
    standin.faults[:] = [429, 503]
    async with make(local, standin) as api:
        assert len(await api.workflows()) == 1
    assert len([c for c in standin.calls if c.path == "/api/v1/workflows"]) == 3


async def test_retries_run_out_with_a_clear_error(local: Settings, standin: StandIn) -> None:
    standin.faults[:] = [502, 502, 502]
    async with make(local, standin) as api:
        with pytest.raises(n8n.N8nFailure, match="502"):
            await api.workflows()


async def test_a_post_is_not_sent_again_after_a_500(local: Settings, standin: StandIn) -> None:
    wf = standin.add_workflow("flow")
    failed = standin.add_execution(wf["id"], "error", error="boom", node="Step 1")
    standin.faults[:] = [500]
    async with make(local, standin) as api:
        with pytest.raises(n8n.N8nFailure, match="500"):
            await api.retry_execution(failed["id"], load_workflow=False)
    assert len([c for c in standin.calls if c.path.endswith("/retry")]) == 1
    # 503 means "not done": that one is sent again.
    standin.faults[:] = [503]
    async with make(local, standin) as api:
        new = await api.retry_execution(failed["id"], load_workflow=False)
    assert new["retryOf"] == failed["id"]


async def test_wrong_key_is_unauthorized(local: Settings, standin: StandIn) -> None:
    async with make(local, standin, key="wrong") as api:
        with pytest.raises(n8n.Unauthorized) as caught:
            await api.probe()
    assert caught.value.kind == "unauthorized"


async def test_probe_reports_version_and_read_scopes(local: Settings, standin: StandIn) -> None:
    async with make(local, standin) as api:
        probe = await api.probe()
    # 2.x tells no version to an API key: the generation comes from the publish route.
    assert probe.version is None and probe.major == 2
    assert probe.capabilities == {"workflow:list": True, "execution:list": True, "tag:list": True}
    standin.version = "1.123.4"
    async with make(local, standin) as api:
        old = await api.probe()
    assert old.version == "1.123.4" and old.major == 1 and api.legacy_publish is True


async def test_loopback_is_refused_without_an_operator_allowance(
    settings: Settings, standin: StandIn
) -> None:
    async with n8n.client_for(settings, standin.base, standin.api_key) as api:
        with pytest.raises(n8n.Unreachable, match="HTTP__ALLOW_PRIVATE_NETWORKS"):
            await api.workflows()
    assert standin.calls == []


async def test_connection_refused_is_unreachable(local: Settings) -> None:
    from tests.support.procs import free_port

    async with n8n.client_for(local, f"http://127.0.0.1:{free_port()}", "k") as api:
        with pytest.raises(n8n.Unreachable, match="cannot connect"):
            await api.workflows()


def test_base_url_forms_reduce_to_the_api_root() -> None:
    assert n8n.api_root("https://n8n.example.com/") == "https://n8n.example.com"
    assert n8n.api_root("https://x.example/n8n/api/v1/") == "https://x.example/n8n"


async def test_ids_cannot_walk_to_other_routes(local: Settings, standin: StandIn) -> None:
    async with make(local, standin) as api:
        with pytest.raises(n8n.Rejected, match="not an n8n id"):
            await api.workflow("../executions")
    assert standin.calls == []


async def test_error_details_come_from_include_data(local: Settings, standin: StandIn) -> None:
    from backend.n8n.sync import error_of

    wf = standin.add_workflow("flow")
    failed = standin.add_execution(wf["id"], "error", error="bad gateway", node="HTTP")
    async with make(local, standin) as api:
        full = await api.execution(failed["id"], include_data=True)
    assert error_of(full) == ("bad gateway", "HTTP")


@pytest.mark.parametrize("key", ["n8n_api_\u2026", "abc\r\nX-Evil: 1"])
async def test_a_stored_key_no_header_can_carry_fails_without_naming_it(
    local: Settings, standin: StandIn, key: str
) -> None:
    """A key stored before the API refused such keys: a clear failure of the instance,
    not the HTTP client's error with the key in it."""
    async with n8n.client_for(local, standin.base, key) as api:
        with pytest.raises(n8n.Unauthorized) as raised:
            await api.workflows()
    assert key not in str(raised.value) and "set it again" in str(raised.value)
    assert standin.calls == []
