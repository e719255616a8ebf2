"""The run-history rules: a workflow's current definition and the figures of its recent
runs in, findings out (each with a kind, a reason quoting the figures, the figures
themselves as evidence, and a patch). Pure: history.py reads the figures.

Every rule compares the runs with the CURRENT definition, so a finding whose patch was
accepted (the node now has a retry policy, a higher limit, the cheaper model, no dead
branch) is not found again.

- missing_retry: a node that failed on transient errors (timeout, connection, 429, 5xx,
  overloaded) that its retry policy does not retry (max_retries 0, or the class not in
  `on`) -> a retry policy covering them.
- timeout_risk: a node whose p95 duration reaches GENERATE__SUGGESTIONS_TIMEOUT_RATIO of
  the time limit that binds it (its own timeout_s, an HTTP/database request's timeout_s,
  the workflow's timeout_s) -> every binding limit raised to twice the p95.
- costly_agent: an agent node whose share of its runs' cost reaches
  GENERATE__SUGGESTIONS_COST_SHARE, on a model dearer than
  GENERATE__SUGGESTIONS_ECONOMY_MODEL -> that model.
- dead_branch: an if/switch branch with a connection that no run took in the window,
  while the node decided at least GENERATE__SUGGESTIONS_MIN_RUNS times -> the branch's
  connections removed, and the nodes only it reached.
- unused_credential: a credential the workflow uses only on nodes that did not run once
  in the window (at least MIN_RUNS runs), and that no other workflow uses -> those nodes
  removed (and what only they reached); the credential is then unused and can go.
  Error handlers (nodes reached only through an `error` branch) are left alone: not
  running is what they are for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from backend.agents import runtime
from backend.config import Settings
from backend.suggestions.patch import apply, unreachable
from backend.workflows.graph import TRANSIENT, RetryPolicy

KINDS = ("missing_retry", "timeout_risk", "costly_agent", "dead_branch", "unused_credential")
# Field limits of the node schemas (graph.py): a proposal never exceeds them.
MAX_NODE_TIMEOUT_S = 86_400
MAX_RUN_TIMEOUT_S = 86_400
REQUEST_TIMEOUT_CAP_S = {"http_request": 600, "database": 3600}


@dataclass
class NodeStats:
    """One node's rows in the window's runs (top-level nodes only)."""

    rows: int = 0
    completed: int = 0
    failed: int = 0
    # Final failures by error class (the node's last attempt).
    failures: dict[str, int] = field(default_factory=dict)
    # Durations of attempts that ended (completed or failed), ms.
    timed: int = 0
    p95_ms: float | None = None
    max_ms: float | None = None
    cost_usd: float = 0.0
    # Total cost of the runs this node was part of.
    runs_cost_usd: float = 0.0
    # Branch taken -> times (if/switch/error).
    branches: dict[str, int] = field(default_factory=dict)

    @property
    def ran(self) -> int:
        return self.completed + self.failed


@dataclass
class History:
    window_days: int
    # Finished runs of the workflow started in the window.
    runs: int
    nodes: dict[str, NodeStats]
    # Credential id (str) -> its name; and those other workflows of the workspace use.
    credential_names: dict[str, str] = field(default_factory=dict)
    shared_credentials: frozenset[str] = frozenset()
    # Agent id (str) -> its model, for agent nodes without an inline model.
    agent_models: dict[str, str] = field(default_factory=dict)


@dataclass
class Finding:
    kind: str
    fingerprint: str
    reason: str
    evidence: dict[str, Any]
    patch: list[dict[str, Any]]


def _nodes(definition: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        n
        for n in definition.get("nodes") or []
        if isinstance(n, dict) and isinstance(n.get("id"), str)
    ]


def _config(node: dict[str, Any]) -> dict[str, Any]:
    config = node.get("config")
    return config if isinstance(config, dict) else {}


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.2g} s"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# missing_retry -----------------------------------------------------------------------------


def missing_retry(
    definition: dict[str, Any], history: History, settings: Settings
) -> list[Finding]:
    out = []
    for node in _nodes(definition):
        stats = history.nodes.get(node["id"])
        if node.get("type") == "trigger" or stats is None:
            continue
        try:
            policy = RetryPolicy.model_validate(node.get("retry") or {})
        except ValueError:
            continue
        uncovered = {
            cls: n
            for cls, n in stats.failures.items()
            if cls in TRANSIENT and (policy.max_retries == 0 or cls not in policy.on)
        }
        count = sum(uncovered.values())
        if count < settings.generate.suggestions_min_transient_failures:
            continue
        default = RetryPolicy()
        proposed: dict[str, Any] = {
            "max_retries": max(policy.max_retries, default.max_retries),
            "backoff_s": policy.backoff_s or default.backoff_s,
            "on": [c for c in TRANSIENT if c in policy.on or c in uncovered],
        }
        classes = ", ".join(f"{cls} x{n}" for cls, n in sorted(uncovered.items()))
        waits = ", ".join(_seconds(s) for s in proposed["backoff_s"][: proposed["max_retries"]])
        why = (
            "has no retries"
            if policy.max_retries == 0
            else f"does not retry {', '.join(sorted(uncovered))}"
        )
        out.append(
            Finding(
                kind="missing_retry",
                fingerprint=f"missing_retry:{node['id']}",
                reason=(
                    f"{node['id']} failed {_plural(count, 'time')} in the last "
                    f"{history.window_days} days on transient errors ({classes}) and {why}; "
                    f"retrying up to {proposed['max_retries']} times ({waits}) would likely "
                    "have saved those runs."
                ),
                evidence={
                    "node_id": node["id"],
                    "window_days": history.window_days,
                    "node_runs": stats.rows,
                    "failed": stats.failed,
                    "transient_failures": dict(sorted(uncovered.items())),
                    "retry_before": policy.model_dump(),
                },
                patch=[
                    {
                        "op": "set_node_field",
                        "node_id": node["id"],
                        "field": "retry",
                        "value": proposed,
                    }
                ],
            )
        )
    return out


# timeout_risk ------------------------------------------------------------------------------


def _limits(node: dict[str, Any], definition: dict[str, Any]) -> list[tuple[str, float, float]]:
    """The time limits on a node as (where, seconds, the most it may be raised to)."""
    settings = definition.get("settings") or {}
    run_limit = settings.get("timeout_s", 3600)
    out: list[tuple[str, float, float]] = []
    if isinstance(run_limit, int | float):
        out.append(("settings.timeout_s", float(run_limit), MAX_RUN_TIMEOUT_S))
    own = node.get("timeout_s")
    if isinstance(own, int | float):
        out.append(("timeout_s", float(own), MAX_NODE_TIMEOUT_S))
    config = _config(node)
    kind = config.get("kind")
    if node.get("type") == "action" and kind in REQUEST_TIMEOUT_CAP_S:
        request = config.get("timeout_s", 30 if kind == "http_request" else None)
        if isinstance(request, int | float):
            out.append(("config.timeout_s", float(request), REQUEST_TIMEOUT_CAP_S[str(kind)]))
    return out


def timeout_risk(definition: dict[str, Any], history: History, settings: Settings) -> list[Finding]:
    out = []
    ratio = settings.generate.suggestions_timeout_ratio
    for node in _nodes(definition):
        stats = history.nodes.get(node["id"])
        if node.get("type") == "trigger" or stats is None or stats.p95_ms is None:
            continue
        if stats.timed < settings.generate.suggestions_min_runs:
            continue
        limits = _limits(node, definition)
        if not limits:
            continue
        binding = min(seconds for _, seconds, _ in limits)
        p95_s = stats.p95_ms / 1000
        if p95_s < ratio * binding:
            continue
        wanted = float(math.ceil(max(p95_s * 2, binding * 1.5)))
        patch: list[dict[str, Any]] = []
        raised: dict[str, float] = {}
        for where, seconds, cap in limits:
            if seconds >= wanted or seconds >= cap:
                continue
            value = min(wanted, cap)
            raised[where] = value
            if where.startswith("settings."):
                patch.append({"op": "set_setting", "field": "timeout_s", "value": int(value)})
            else:
                patch.append(
                    {"op": "set_node_field", "node_id": node["id"], "field": where, "value": value}
                )
        new_binding = min(raised.get(where, seconds) for where, seconds, _ in limits)
        if not patch or new_binding <= binding:
            continue  # at the schema's ceiling already: nothing a patch can raise
        out.append(
            Finding(
                kind="timeout_risk",
                fingerprint=f"timeout_risk:{node['id']}",
                reason=(
                    f"{node['id']} took {_seconds(p95_s)} at p95 over "
                    f"{_plural(stats.timed, 'run')} in the last {history.window_days} days, "
                    f"{p95_s / binding:.0%} of its {_seconds(binding)} limit; a slightly slower "
                    f"day fails it. Raise the limit to {_seconds(new_binding)}."
                ),
                evidence={
                    "node_id": node["id"],
                    "window_days": history.window_days,
                    "samples": stats.timed,
                    "p95_ms": round(stats.p95_ms, 1),
                    "max_ms": round(stats.max_ms, 1) if stats.max_ms is not None else None,
                    "limit_s": binding,
                    "limits": {where: seconds for where, seconds, _ in limits},
                    "timeouts": stats.failures.get("timeout", 0),
                },
                patch=patch,
            )
        )
    return out


# costly_agent ------------------------------------------------------------------------------


def _unit_price(settings: Settings, model: str) -> float | None:
    """Input plus output USD per million tokens (an even mix, to compare models)."""
    usage = SimpleNamespace(input_tokens=1_000_000, output_tokens=1_000_000)
    return runtime.price_of(settings.anthropic.prices, model, usage)


def costly_agent(definition: dict[str, Any], history: History, settings: Settings) -> list[Finding]:
    out: list[Finding] = []
    gen = settings.generate
    economy = gen.suggestions_economy_model
    economy_price = _unit_price(settings, economy)
    if economy_price is None:
        return out
    for node in _nodes(definition):
        stats = history.nodes.get(node["id"])
        if node.get("type") != "agent" or stats is None or stats.ran < gen.suggestions_min_runs:
            continue
        if stats.cost_usd <= 0 or stats.runs_cost_usd <= 0:
            continue
        share = min(stats.cost_usd / stats.runs_cost_usd, 1.0)
        if share < gen.suggestions_cost_share:
            continue
        config = _config(node)
        model = config.get("model") or history.agent_models.get(str(config.get("agent_id")))
        model = str(model or settings.anthropic.default_model)
        price = _unit_price(settings, model)
        if price is None or price <= economy_price or model.startswith(economy):
            continue
        saving = stats.cost_usd * (1 - economy_price / price)
        out.append(
            Finding(
                kind="costly_agent",
                fingerprint=f"costly_agent:{node['id']}",
                reason=(
                    f"{node['id']} cost ${stats.cost_usd:.4f} of the ${stats.runs_cost_usd:.4f} "
                    f"its {_plural(stats.ran, 'run')} cost in the last {history.window_days} "
                    f"days ({share:.0%}) on {model}; {economy} would have cost about "
                    f"${stats.cost_usd - saving:.4f}. Worth trying if its answers hold up."
                ),
                evidence={
                    "node_id": node["id"],
                    "window_days": history.window_days,
                    "node_runs": stats.ran,
                    "node_cost_usd": round(stats.cost_usd, 6),
                    "runs_cost_usd": round(stats.runs_cost_usd, 6),
                    "share": round(share, 4),
                    "model": model,
                    "proposed_model": economy,
                    "estimated_saving_usd": round(saving, 6),
                },
                patch=[
                    {
                        "op": "set_node_field",
                        "node_id": node["id"],
                        "field": "config.model",
                        "value": economy,
                    }
                ],
            )
        )
    return out


# dead_branch and unused_credential ---------------------------------------------------------


def _removal(
    definition: dict[str, Any], first: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[str]]:
    """`first` (removals), then every node no trigger reaches any more: the patch, and
    the ids of the nodes it removes."""
    already = set(unreachable(definition))
    gone = [n for n in unreachable(apply(definition, first)) if n not in already]
    patch = first + [{"op": "remove_node", "node_id": n} for n in gone]
    removed = [op["node_id"] for op in first if op["op"] == "remove_node"] + gone
    return patch, removed


def _credentials_of(nodes: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for node in nodes:
        cred = _config(node).get("credential_id")
        if cred:
            out.setdefault(str(cred), []).append(node["id"])
    return out


def _freed(
    definition: dict[str, Any], removed: list[str], history: History
) -> list[dict[str, str]]:
    """Credentials that no node keeps once `removed` go, and no other workflow uses."""
    nodes = _nodes(definition)
    before = _credentials_of(nodes)
    after = _credentials_of([n for n in nodes if n["id"] not in removed])
    return [
        {"id": cred, "name": history.credential_names.get(cred, cred)}
        for cred in before
        if cred not in after and cred not in history.shared_credentials
    ]


def dead_branch(definition: dict[str, Any], history: History, settings: Settings) -> list[Finding]:
    out = []
    connections = [c for c in definition.get("connections") or [] if isinstance(c, dict)]
    for node in _nodes(definition):
        config = _config(node)
        stats = history.nodes.get(node["id"])
        if node.get("type") != "logic" or config.get("kind") not in ("if", "switch"):
            continue
        decided = sum(stats.branches.values()) if stats else 0
        if stats is None or decided < settings.generate.suggestions_min_runs:
            continue
        labels = sorted(
            {
                str(c["branch"])
                for c in connections
                if c.get("source") == node["id"] and c.get("branch") not in (None, "error")
            }
        )
        for label in labels:
            if stats.branches.get(label):
                continue
            first = [
                {"op": "remove_connection", "source": node["id"], "target": c["target"],
                 "branch": label}
                for c in connections
                if c.get("source") == node["id"] and c.get("branch") == label
            ]  # fmt: skip
            patch, removed = _removal(definition, first)
            freed = _freed(definition, removed, history)
            taken = ", ".join(f"{b} x{n}" for b, n in sorted(stats.branches.items()))
            out.append(
                Finding(
                    kind="dead_branch",
                    fingerprint=f"dead_branch:{node['id']}:{label}",
                    reason=(
                        f"The {label!r} branch of {node['id']} was never taken in "
                        f"{_plural(decided, 'run')} over the last {history.window_days} days "
                        f"({taken}). Removing it"
                        + (f" drops {', '.join(removed)}" if removed else "")
                        + (
                            f" and frees the credential {', '.join(c['name'] for c in freed)}"
                            if freed
                            else ""
                        )
                        + "."
                    ),
                    evidence={
                        "node_id": node["id"],
                        "branch": label,
                        "window_days": history.window_days,
                        "decisions": decided,
                        "branches_taken": dict(sorted(stats.branches.items())),
                        "nodes_removed": removed,
                        "credentials_freed": freed,
                    },
                    patch=patch,
                )
            )
    return out


def unused_credential(
    definition: dict[str, Any], history: History, settings: Settings, covered: set[str]
) -> list[Finding]:
    """`covered`: nodes another finding already removes (its reason names the credential)."""
    out: list[Finding] = []
    if history.runs < settings.generate.suggestions_min_runs:
        return out
    nodes = _nodes(definition)
    # Reached only through an error branch: a handler that did not run did its job.
    handlers = set(unreachable(definition, ignore_branches=("error",)))
    for cred, holders in _credentials_of(nodes).items():
        if cred in history.shared_credentials or set(holders) <= covered:
            continue
        if any(h in handlers for h in holders):
            continue
        if any(history.nodes.get(h, NodeStats()).ran for h in holders):
            continue
        patch, removed = _removal(
            definition, [{"op": "remove_node", "node_id": h} for h in holders]
        )
        name = history.credential_names.get(cred, cred)
        out.append(
            Finding(
                kind="unused_credential",
                fingerprint=f"unused_credential:{cred}",
                reason=(
                    f"The credential {name!r} is used only by {', '.join(holders)}, which did "
                    f"not run once in {_plural(history.runs, 'run')} over the last "
                    f"{history.window_days} days, and by no other workflow. Remove "
                    f"{', '.join(removed)}; the credential is then unused and can be deleted."
                ),
                evidence={
                    "credential_id": cred,
                    "credential_name": name,
                    "nodes": holders,
                    "window_days": history.window_days,
                    "runs": history.runs,
                    "nodes_removed": removed,
                },
                patch=patch,
            )
        )
    return out


def evaluate(definition: dict[str, Any], history: History, settings: Settings) -> list[Finding]:
    """Every finding for this definition, in a stable order."""
    found = missing_retry(definition, history, settings)
    found += timeout_risk(definition, history, settings)
    found += costly_agent(definition, history, settings)
    branches = dead_branch(definition, history, settings)
    found += branches
    covered = {n for f in branches for n in f.evidence["nodes_removed"]}
    found += unused_credential(definition, history, settings, covered)
    return found
