"""Workflow definitions several test packages run: a manual trigger and a chain of
transforms that each add one."""

from __future__ import annotations

from typing import Any


def trig() -> dict[str, Any]:
    return {"id": "start", "type": "trigger", "config": {"kind": "manual"}}


def chain(n: int) -> dict[str, Any]:
    """start -> n0 -> ... -> n{n-1}; node i outputs trigger.x + i + 1."""
    nodes = [trig()]
    conns = []
    previous = "start"
    for i in range(n):
        source = "{{ trigger.x + 1 }}" if i == 0 else "{{ nodes.n" + str(i - 1) + ".output + 1 }}"
        nodes.append(
            {
                "id": f"n{i}",
                "type": "logic",
                "config": {"kind": "transform", "template": source},
            }
        )
        conns.append({"source": previous, "target": f"n{i}"})
        previous = f"n{i}"
    return {"nodes": nodes, "connections": conns, "settings": {}}
