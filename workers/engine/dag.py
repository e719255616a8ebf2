"""What runs next: pure functions over the validated graph and the nodes' states.

Edges carry an optional branch label. An edge is *live* when its source completed and
took that branch (or the edge has none); *dead* when its source was skipped, took
another branch, or failed; *open* while its source has not finished. Then, for a node
still pending:

- it is **ready** when no incoming edge is open and at least one is live — or, for a
  `merge` in mode `any`, as soon as one is live;
- it is **skipped** when no incoming edge is open and none is live (untaken branches and
  everything only they lead to);
- a node without incoming edges is ready at once (the run's trigger).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import networkx as nx

from backend.executions.state import NodeStatus

N = NodeStatus
FINISHED = frozenset({N.COMPLETED, N.FAILED, N.SKIPPED, N.CANCELLED})


@dataclass(frozen=True, slots=True)
class NodeState:
    status: NodeStatus
    # The branch a finished node took: "true"/"false" for if, a case label or "default"
    # for switch, "error" for a failed node with continue_on_error; None otherwise.
    branch: str | None = None


def edge_state(graph: nx.DiGraph, source: str, target: str, states: Mapping[str, NodeState]) -> str:  # type: ignore[type-arg]
    state = states.get(source)
    if state is None or state.status not in FINISHED:
        return "open"
    if state.status != N.COMPLETED and not (state.status == N.FAILED and state.branch == "error"):
        return "dead"
    label = graph.edges[source, target].get("branch")
    if label is None:
        # An unlabelled edge out of a node that failed onto its error branch is dead:
        # only the "error" edge carries on.
        return "dead" if state.branch == "error" else "live"
    return "live" if label == state.branch else "dead"


def topological_order(graph: nx.DiGraph) -> list[str]:  # type: ignore[type-arg]
    """Computed once per graph object (validated graphs are cached and never change),
    not once per generation of every run."""
    order: list[str] | None = graph.graph.get("_order")
    if order is None:
        order = list(nx.topological_sort(graph))
        graph.graph["_order"] = order
    return order


def next_steps(
    graph: nx.DiGraph,  # type: ignore[type-arg]
    states: Mapping[str, NodeState],
    merge_any: frozenset[str] = frozenset(),
    start: str | None = None,
) -> tuple[list[str], list[str]]:
    """(ready, skipped) among the nodes still pending, in topological order.

    `start` is the trigger this run came through: other trigger nodes are skipped.
    """
    ready: list[str] = []
    skipped: list[str] = []
    for node in topological_order(graph):
        if states.get(node, NodeState(N.PENDING)).status != N.PENDING:
            continue
        incoming = list(graph.predecessors(node))
        if not incoming:
            (ready if start is None or node == start else skipped).append(node)
            continue
        edges = [edge_state(graph, p, node, states) for p in incoming]
        if node in merge_any and "live" in edges:
            ready.append(node)
        elif "open" in edges:
            continue
        elif "live" in edges:
            ready.append(node)
        else:
            skipped.append(node)
    return ready, skipped


def skip_closure(
    graph: nx.DiGraph,  # type: ignore[type-arg]
    states: Mapping[str, NodeState],
    merge_any: frozenset[str] = frozenset(),
    start: str | None = None,
) -> tuple[list[str], dict[str, NodeState]]:
    """Apply skips until none is left; return the ready nodes and the new states.
    Skipping one node can settle its dependants, so this runs to a fixed point."""
    current = dict(states)
    while True:
        ready, skipped = next_steps(graph, current, merge_any, start)
        if not skipped:
            return ready, current
        for node in skipped:
            current[node] = NodeState(N.SKIPPED)


def is_finished(graph: nx.DiGraph, states: Mapping[str, NodeState]) -> bool:  # type: ignore[type-arg]
    return all(states.get(n, NodeState(N.PENDING)).status in FINISHED for n in graph.nodes)


def failed_nodes(states: Mapping[str, NodeState], continue_on_error: frozenset[str]) -> list[str]:
    """Failures that fail the run: those without continue_on_error."""
    return [n for n, s in states.items() if s.status == N.FAILED and n not in continue_on_error]


def merge_any_nodes(configs: Mapping[str, Any]) -> frozenset[str]:
    return frozenset(
        node
        for node, cfg in configs.items()
        if getattr(cfg, "kind", None) == "merge" and getattr(cfg, "mode", "all") == "any"
    )
