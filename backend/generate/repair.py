"""Deterministic repairs of a drafted definition, applied before the validator and the
model see it again. Only changes whose intent is unambiguous: a connection to a node that
does not exist carries nothing, a second copy of an edge adds nothing, and a workflow
with no trigger means "run it by hand". Everything else (a cycle, a wrong template) is
the model's to fix, with the validator's problems in hand. Pure."""

from __future__ import annotations

import copy
from typing import Any

TRIGGER_ID = "start"


def _unique_id(taken: set[str], base: str) -> str:
    if base not in taken:
        return base
    n = 2
    while f"{base}_{n}" in taken:
        n += 1
    return f"{base}_{n}"


def repair(definition: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A repaired copy and what was changed, one sentence per change."""
    out = copy.deepcopy(definition)
    done: list[str] = []
    nodes = out.get("nodes")
    connections = out.get("connections")
    if not isinstance(nodes, list) or not isinstance(connections, list):
        return out, done
    node_list = [n for n in nodes if isinstance(n, dict)]
    ids = {n["id"] for n in node_list if isinstance(n.get("id"), str)}
    kept: list[Any] = []
    seen: set[tuple[Any, Any, Any]] = set()
    for conn in connections:
        if not isinstance(conn, dict):
            kept.append(conn)
            continue
        source, target = conn.get("source"), conn.get("target")
        missing = [end for end in (source, target) if end not in ids]
        if missing:
            done.append(f"removed connection {source} -> {target}: no node {missing[0]!r}")
            continue
        if source == target:
            done.append(f"removed connection {source} -> {target}: a node cannot feed itself")
            continue
        key = (source, target, conn.get("branch"))
        if key in seen:
            done.append(f"removed a duplicate connection {source} -> {target}")
            continue
        seen.add(key)
        kept.append(conn)
    out["connections"] = kept
    if node_list and not any(n.get("type") == "trigger" for n in node_list):
        trigger_id = _unique_id(ids, TRIGGER_ID)
        targets = {c.get("target") for c in kept if isinstance(c, dict)}
        roots = [
            n["id"] for n in node_list if isinstance(n.get("id"), str) and n["id"] not in targets
        ]
        if not roots:
            # Every node has an input (a cycle): start at the first one listed.
            first = next((n.get("id") for n in node_list if isinstance(n.get("id"), str)), None)
            roots = [first] if first else []
        nodes.insert(0, {"id": trigger_id, "type": "trigger", "config": {"kind": "manual"}})
        out["connections"] = [{"source": trigger_id, "target": r} for r in roots] + kept
        done.append(
            f"added a manual trigger {trigger_id!r} feeding {', '.join(roots) or 'nothing'}"
        )
    return out, done


UI_FIELDS = ("position", "label")


def keep_ui_fields(definition: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    """An edit keeps where the person placed each node: the model is not asked to echo
    positions back, so a node it kept (same id) gets its old position and label."""
    if not base or not isinstance(definition.get("nodes"), list):
        return definition
    old = {n.get("id"): n for n in base.get("nodes", []) if isinstance(n, dict) and "id" in n}
    nodes = []
    for node in definition["nodes"]:
        if isinstance(node, dict) and node.get("id") in old:
            before = old[node["id"]]
            node = {
                **{f: before[f] for f in UI_FIELDS if f in before and node.get(f) is None},
                **{k: v for k, v in node.items() if not (k in UI_FIELDS and v is None)},
            }
        nodes.append(node)
    return {**definition, "nodes": nodes}
