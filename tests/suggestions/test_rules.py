"""The pure parts: patch operations and the run-history rules over made-up figures."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from backend.config import Settings
from backend.generate.service import _system
from backend.suggestions import patch
from backend.suggestions.rules import History, NodeStats, evaluate
from backend.workflows.graph import Context, validate

CRED = str(uuid.uuid4())


def node(node_id: str, type_: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": node_id, "type": type_, "config": config, **extra}


def http(node_id: str, **extra: Any) -> dict[str, Any]:
    return node(node_id, "action", {"kind": "http_request", "url": "https://x.test/"}, **extra)


START = node("start", "trigger", {"kind": "manual"})


def edge(source: str, target: str, branch: str | None = None) -> dict[str, Any]:
    return {"source": source, "target": target, **({"branch": branch} if branch else {})}


def history(runs: int = 20, **nodes: NodeStats) -> History:
    return History(window_days=30, runs=runs, nodes=dict(nodes), credential_names={CRED: "Vault"})


# Patches ---------------------------------------------------------------------------------


def test_patch_operations_change_a_copy() -> None:
    before = {"nodes": [START, http("fetch")], "connections": [edge("start", "fetch")]}
    after = patch.apply(
        before,
        [
            {"op": "set_node_field", "node_id": "fetch", "field": "config.timeout_s", "value": 90},
            {"op": "add_node", "node": http("more")},
            {"op": "add_connection", "source": "fetch", "target": "more"},
            {"op": "set_setting", "field": "timeout_s", "value": 600},
            {"op": "set_node_field", "node_id": "fetch", "field": "config.url", "value": None},
        ],
    )
    assert after["nodes"][1]["config"] == {"kind": "http_request", "timeout_s": 90}
    assert after["connections"][-1] == edge("fetch", "more")
    assert after["settings"] == {"timeout_s": 600}
    assert before["nodes"][1]["config"]["url"] == "https://x.test/"  # untouched
    removed = patch.apply(after, [{"op": "remove_node", "node_id": "fetch"}])
    assert [n["id"] for n in removed["nodes"]] == ["start", "more"]
    assert removed["connections"] == []


@pytest.mark.parametrize(
    ("ops", "message"),
    [
        ([{"op": "remove_node", "node_id": "nope"}], "operation 0: no node 'nope'"),
        ([{"op": "set_node_field", "node_id": "fetch", "field": "id", "value": "x"}], "id"),
        ([{"op": "set_node_field", "node_id": "fetch", "field": "a..b"}], "field"),
        ([{"op": "set_node_field", "node_id": "fetch", "field": "config[0]"}], "pattern"),
        ([{"op": "remove_connection", "source": "fetch", "target": "start"}], "no connection"),
        ([{"op": "add_connection", "source": "start", "target": "fetch"}], "already exists"),
        ([{"op": "add_node", "node": {"type": "action"}}], "string id"),
        ([{"op": "explode"}], "operation 0"),
        ({"op": "remove_node"}, "a list"),
        ([{"op": "set_node_field", "node_id": "fetch", "field": "config.url.x", "value": 1}],
         "not an object"),
    ],
)  # fmt: skip
def test_a_patch_that_does_not_fit_is_refused_with_the_operation(ops: Any, message: str) -> None:
    before = {"nodes": [START, http("fetch")], "connections": [edge("start", "fetch")]}
    with pytest.raises(patch.PatchError) as err:
        patch.apply(before, ops)
    assert message in str(err.value)


# Rules -----------------------------------------------------------------------------------


def test_transient_failures_without_retry_give_a_retry_policy(settings: Settings) -> None:
    definition = {
        "nodes": [START, http("fetch", retry={"max_retries": 0}), http("ok")],
        "connections": [edge("start", "fetch"), edge("start", "ok")],
    }
    found = evaluate(
        definition,
        history(
            fetch=NodeStats(
                rows=10, completed=7, failed=3, failures={"server_error": 2, "timeout": 1}
            ),
            # Permanent failures are not worth retrying; "ok" has the default policy.
            ok=NodeStats(rows=10, completed=5, failed=5, failures={"permanent": 5}),
        ),
        settings,
    )  # fmt: skip
    assert [f.fingerprint for f in found] == ["missing_retry:fetch"]
    [f] = found
    assert f.patch == [
        {"op": "set_node_field", "node_id": "fetch", "field": "retry",
         "value": {"max_retries": 3, "backoff_s": [5.0, 30.0, 120.0],
                   "on": ["timeout", "connection", "rate_limited", "server_error",
                          "overloaded"]}},
    ]  # fmt: skip
    assert f.evidence["transient_failures"] == {"server_error": 2, "timeout": 1}
    assert "failed 3 times" in f.reason and "has no retries" in f.reason
    after = validate(patch.apply(definition, f.patch), Context()).definition
    assert after["nodes"][1]["retry"]["max_retries"] == 3


def test_a_class_left_out_of_on_is_found_and_added(settings: Settings) -> None:
    definition = {
        "nodes": [START, http("fetch", retry={"max_retries": 2, "on": ["timeout"]})],
        "connections": [edge("start", "fetch")],
    }
    stats = NodeStats(rows=9, failed=4, failures={"rate_limited": 3, "timeout": 1})
    [f] = evaluate(definition, history(fetch=stats), settings)
    assert f.patch[0]["value"]["on"] == ["timeout", "rate_limited"]
    assert f.patch[0]["value"]["max_retries"] == 3
    # One failure is below GENERATE__SUGGESTIONS_MIN_TRANSIENT_FAILURES (2).
    one = NodeStats(rows=9, failed=1, failures={"rate_limited": 1})
    assert evaluate(definition, history(fetch=one), settings) == []


def test_a_p95_near_the_limit_raises_every_limit_that_binds(settings: Settings) -> None:
    definition = {
        "nodes": [START, http("fetch", timeout_s=20)],
        "connections": [edge("start", "fetch")],
        "settings": {"timeout_s": 30},
    }
    slow = NodeStats(rows=10, completed=10, timed=10, p95_ms=18_000, max_ms=19_500)
    [f] = evaluate(definition, history(fetch=slow), settings)
    assert f.kind == "timeout_risk" and f.evidence["limit_s"] == 20
    assert [(op["op"], op["field"], op["value"]) for op in f.patch] == [
        ("set_setting", "timeout_s", 36),  # the workflow's run limit
        ("set_node_field", "timeout_s", 36.0),  # the node's own
        ("set_node_field", "config.timeout_s", 36.0),  # the request's (default 30)
    ]
    assert "90% of its 20 s limit" in f.reason
    fast = NodeStats(rows=10, completed=10, timed=10, p95_ms=5_000)
    assert evaluate(definition, history(fetch=fast), settings) == []
    few = NodeStats(rows=3, completed=3, timed=3, p95_ms=19_000)
    assert evaluate(definition, history(fetch=few), settings) == []


def test_a_limit_at_its_ceiling_gives_no_suggestion(settings: Settings) -> None:
    definition = {
        "nodes": [START, http("fetch")],
        "connections": [edge("start", "fetch")],
    }
    definition["nodes"][1]["config"]["timeout_s"] = 600
    stuck = NodeStats(rows=10, completed=10, timed=10, p95_ms=590_000)
    assert evaluate(definition, history(fetch=stuck), settings) == []


def test_an_agent_that_dominates_the_cost_is_moved_to_the_economy_model(settings: Settings) -> None:
    agent = node("think", "agent", {"model": "claude-opus-4-1", "prompt": "hi"})
    definition = {"nodes": [START, agent], "connections": [edge("start", "think")]}
    costly = NodeStats(rows=10, completed=10, cost_usd=0.9, runs_cost_usd=1.0)
    [f] = evaluate(definition, history(think=costly), settings)
    assert f.kind == "costly_agent"
    assert f.patch == [
        {"op": "set_node_field", "node_id": "think", "field": "config.model",
         "value": "claude-haiku-4-5"}
    ]  # fmt: skip
    assert f.evidence["share"] == 0.9
    # Haiku at $1+$5 against Opus 4.1 at $15+$75 per million: 1/15 of the cost.
    assert f.evidence["estimated_saving_usd"] == pytest.approx(0.9 * (1 - 6 / 90))
    cheap = {**agent, "config": {**agent["config"], "model": "claude-haiku-4-5"}}
    other = {"nodes": [START, cheap], "connections": [edge("start", "think")]}
    assert evaluate(other, history(think=costly), settings) == []
    small = NodeStats(rows=10, completed=10, cost_usd=0.2, runs_cost_usd=1.0)
    assert evaluate(definition, history(think=small), settings) == []


def test_a_branch_never_taken_is_removed_with_what_only_it_reached(settings: Settings) -> None:
    definition = {
        "nodes": [
            START,
            node("check", "logic", {"kind": "if", "condition": "trigger.n > 1"}),
            http("big"),
            node("alert", "action", {"kind": "http_request", "url": "https://x.test/",
                                     "credential_id": CRED}),
            http("small"),
            node("join", "logic", {"kind": "merge"}),
        ],
        "connections": [
            edge("start", "check"), edge("check", "big", "true"), edge("big", "alert"),
            edge("check", "small", "false"), edge("alert", "join"), edge("small", "join"),
        ],
    }  # fmt: skip
    stats = NodeStats(rows=12, completed=12, branches={"false": 12})
    found = evaluate(definition, history(check=stats), settings)
    # The credential is freed by the branch's removal: said there, not twice.
    assert [f.fingerprint for f in found] == ["dead_branch:check:true"]
    [f] = found
    assert f.evidence["nodes_removed"] == ["big", "alert"]
    assert f.evidence["credentials_freed"] == [{"id": CRED, "name": "Vault"}]
    after = patch.apply(definition, f.patch)
    assert [n["id"] for n in after["nodes"]] == ["start", "check", "small", "join"]
    assert "never taken in 12 runs" in f.reason and "frees the credential Vault" in f.reason
    few = history(runs=4, check=NodeStats(branches={"false": 4}))
    assert evaluate(definition, few, settings) == []


def test_a_credential_only_on_nodes_that_never_run_is_found(settings: Settings) -> None:
    sender = http("report")
    sender["config"]["credential_id"] = CRED
    handler = http("on_error")
    handler["config"]["credential_id"] = str(uuid.uuid4())
    definition = {
        "nodes": [START, http("fetch", continue_on_error=True), sender, handler],
        "connections": [
            edge("start", "fetch"), edge("fetch", "report", "error"),
            edge("fetch", "on_error", "error"),
        ],
    }  # fmt: skip
    # Both are error handlers: not running is their job.
    ran = history(fetch=NodeStats(rows=20, completed=20))
    assert evaluate(definition, ran, settings) == []
    definition["connections"][1] = edge("start", "report")
    [f] = evaluate(definition, ran, settings)
    assert (f.kind, f.evidence["nodes_removed"]) == ("unused_credential", ["report"])
    assert "'Vault' is used only by report" in f.reason
    # Another workflow uses it: it is not about to be unused.
    shared = History(30, 20, ran.nodes, shared_credentials=frozenset({CRED}))
    assert evaluate(definition, shared, settings) == []
    assert evaluate(definition, history(runs=2, fetch=NodeStats(rows=2)), settings) == []


def test_the_generator_is_told_to_subscript_keys_named_like_dict_methods() -> None:
    text = _system([], [], None, None)
    assert "trigger['items']" in text and "`trigger.items` is the dict's method" in text
