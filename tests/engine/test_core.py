"""The engine's pure core, without any server: the state machines, what runs next
(branches, skips, merges), and which failures are retried when."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TypedDict

import networkx as nx
import pytest

from backend.executions.state import NodeStatus as N
from backend.executions.state import transition
from backend.kit.errors import InvalidTransition
from workers.engine.dag import NodeState, failed_nodes, is_finished, next_steps, skip_closure
from workers.engine.retry import NodeFailure, classify, classify_status, retry_delay

NOW = datetime(2026, 11, 23, tzinfo=UTC)


def graph(*edges: tuple[str, str] | tuple[str, str, str]) -> nx.DiGraph:  # type: ignore[type-arg]
    g: nx.DiGraph = nx.DiGraph()  # type: ignore[type-arg]
    for edge in edges:
        g.add_edge(edge[0], edge[1], branch=edge[2] if len(edge) == 3 else None)
    return g


def done(branch: str | None = None) -> NodeState:
    return NodeState(N.COMPLETED, branch)


@pytest.mark.parametrize(
    ("kind", "old", "new", "ok"),
    [
        ("execution", "pending", "running", True),
        ("execution", "pending", "cancelled", True),
        ("execution", "running", "completed", True),
        ("execution", "running", "pending", True),
        ("execution", "completed", "running", False),
        ("execution", "cancelled", "running", False),
        ("execution", "pending", "completed", False),
        ("node", "running", "retrying", True),
        ("node", "retrying", "running", True),
        ("node", "completed", "running", False),
        ("node", "skipped", "running", False),
        ("node", "pending", "completed", False),
    ],
)
def test_transition_table(kind: str, old: str, new: str, ok: bool) -> None:
    if ok:
        assert transition(kind, old, new, at=NOW).new == new
    else:
        with pytest.raises(InvalidTransition):
            transition(kind, old, new, at=NOW)


def test_a_chain_runs_one_node_at_a_time() -> None:
    g = graph(("t", "a"), ("a", "b"))
    assert next_steps(g, {}) == (["t"], [])
    assert next_steps(g, {"t": done()}) == (["a"], [])
    assert next_steps(g, {"t": done(), "a": NodeState(N.RUNNING)}) == ([], [])
    assert is_finished(g, {"t": done(), "a": done(), "b": done()})


def test_a_generation_is_ready_together() -> None:
    g = graph(("t", "x"), ("t", "y"), ("t", "z"), ("x", "j"), ("y", "j"), ("z", "j"))
    assert next_steps(g, {"t": done()})[0] == ["x", "y", "z"]
    # The join waits for all three.
    assert (
        next_steps(g, {"t": done(), "x": done(), "y": done(), "z": NodeState(N.RUNNING)})[0] == []
    )
    assert next_steps(g, {"t": done(), "x": done(), "y": done(), "z": done()})[0] == ["j"]


def test_an_untaken_branch_and_everything_only_it_leads_to_is_skipped() -> None:
    g = graph(
        ("t", "if"),
        ("if", "yes", "true"),
        ("if", "no", "false"),
        ("no", "after_no"),
        ("yes", "join"),
        ("after_no", "join"),
    )
    ready, states = skip_closure(g, {"t": done(), "if": done("true")})
    assert ready == ["yes"]
    assert states["no"].status == N.SKIPPED
    assert states["after_no"].status == N.SKIPPED
    # The join still runs once the taken side finishes: one live input is enough.
    ready, states = skip_closure(g, {**states, "yes": done()})
    assert ready == ["join"]


def test_merge_all_waits_and_merge_any_does_not() -> None:
    g = graph(("t", "a"), ("t", "b"), ("a", "m"), ("b", "m"))
    states = {"t": done(), "a": done(), "b": NodeState(N.RUNNING)}
    assert next_steps(g, states)[0] == []
    assert next_steps(g, states, merge_any=frozenset({"m"}))[0] == ["m"]


def test_switch_default_and_error_branches() -> None:
    g = graph(
        ("t", "sw"),
        ("sw", "hi", "high"),
        ("sw", "other", "default"),
        ("t", "call"),
        ("call", "fallback", "error"),
        ("call", "next"),
    )
    ready, states = skip_closure(
        g, {"t": done(), "sw": done("default"), "call": NodeState(N.FAILED, "error")}
    )
    assert sorted(ready) == ["fallback", "other"]
    assert states["hi"].status == N.SKIPPED
    assert states["next"].status == N.SKIPPED


def test_other_triggers_are_skipped() -> None:
    g = graph(("manual", "a"), ("cron", "a"))
    ready, states = skip_closure(g, {}, start="manual")
    assert ready == ["manual"]
    assert states["cron"].status == N.SKIPPED


def test_failures_fail_the_run_unless_continued() -> None:
    states = {"a": NodeState(N.FAILED), "b": NodeState(N.FAILED, "error")}
    assert failed_nodes(states, frozenset({"b"})) == ["a"]


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (429, "rate limited", "rate_limited"),
        (429, "Your credit balance is too low", "permanent"),
        (529, "", "overloaded"),
        (503, "", "server_error"),
        (404, "", "permanent"),
        (400, "", "permanent"),
        (408, "", "timeout"),
    ],
)
def test_status_classification(status: int, body: str, expected: str) -> None:
    assert classify_status(status, body) == expected


def test_a_connection_failure_never_quotes_what_httpx_quoted() -> None:
    """httpx's LocalProtocolError quotes the header value it refused (a credential's
    token with a CR/LF in it); a node's error is shown to every reader of the run. Our
    own guard's messages (no such name, an address that may not be reached) are shown."""
    import httpx

    from backend.kit.http_guard import Unresolvable

    leaked = classify(httpx.LocalProtocolError("Illegal header value b'Bearer SECRET\\r\\nX: 1'"))
    assert leaked.error_class == "connection" and "SECRET" not in str(leaked)
    named = classify(Unresolvable("n8n.nothing.invalid does not resolve"))
    assert "does not resolve" in str(named)


class Policy(TypedDict):
    max_retries: int
    backoff_s: list[float]
    retry_on: list[str]
    max_countdown_s: float


def test_retry_delays_follow_the_policy_and_never_outlast_the_broker() -> None:
    policy = Policy(
        max_retries=3,
        backoff_s=[5.0, 30.0, 120.0],
        retry_on=["timeout", "rate_limited", "server_error"],
        max_countdown_s=60.0,
    )
    transient = NodeFailure("boom", "server_error")
    assert [retry_delay(transient, attempt=a, **policy) for a in (1, 2, 3, 4)] == [
        5.0,
        30.0,
        60.0,
        None,
    ]
    assert retry_delay(NodeFailure("bad request", "permanent"), attempt=1, **policy) is None
    assert (
        retry_delay(NodeFailure("slow", "overloaded"), attempt=1, **policy) is None
    )  # not in retry_on
    assert (
        retry_delay(NodeFailure("later", "rate_limited", retry_after_s=45), attempt=1, **policy)
        == 45.0
    )
