"""The figures the run-history rules read: per node of a workflow, over the finished runs
started in the window, in three aggregate queries (rows, durations and cost; final
failures by class; branches taken), plus what the workspace knows once per pass
(credential names and users, agents' models)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from backend.models import Agent, Credential, Workflow, WorkflowVersion
from backend.suggestions.rules import History, NodeStats
from backend.workflows.graph import node_configs

# Top-level nodes only: a loop body's node is `<loop>.<node>` (ids have no dots).
_RUNS = """
    FROM node_executions n
    JOIN workflow_executions e ON e.id = n.execution_id
    WHERE e.workflow_id = :workflow_id
      AND e.created_at >= :since
      AND e.status IN ('completed', 'failed', 'cancelled')
      AND strpos(n.node_id, '.') = 0
"""
NODE_FIGURES = text(
    """
    SELECT n.node_id,
           count(*) AS rows,
           count(*) FILTER (WHERE n.status IN ('completed')) AS completed,
           count(*) FILTER (WHERE n.status IN ('failed')) AS failed,
           count(n.duration_ms) FILTER (WHERE n.status IN ('completed', 'failed')) AS timed,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY n.duration_ms)
               FILTER (WHERE n.status IN ('completed', 'failed')) AS p95_ms,
           max(n.duration_ms) FILTER (WHERE n.status IN ('completed', 'failed')) AS max_ms,
           coalesce(sum(n.cost_usd), 0) AS cost_usd,
           coalesce(sum(e.cost_usd), 0) AS runs_cost_usd
    """
    + _RUNS
    + " GROUP BY n.node_id"
)
FAILURES = text(
    "SELECT n.node_id, coalesce(n.error->>'class', 'permanent') AS cls, count(*) AS n"
    + _RUNS
    + " AND n.status IN ('failed') GROUP BY 1, 2"
)
BRANCHES = text(
    "SELECT n.node_id, n.branch, count(*) AS n"
    + _RUNS
    + " AND n.status IN ('completed') AND n.branch IS NOT NULL GROUP BY 1, 2"
)
RUNS = text(
    """
    SELECT count(*) FROM workflow_executions
    WHERE workflow_id = :workflow_id AND created_at >= :since
      AND status IN ('completed', 'failed', 'cancelled')
    """
)


# Workflows a recompute pass looks at: those with finished runs started in the window,
# and those with open run-history suggestions (their findings may be gone).
TO_RECOMPUTE = text(
    """
    SELECT w.workspace_id, w.id FROM workflows w
    WHERE w.id IN (SELECT DISTINCT workflow_id FROM workflow_executions
                   WHERE created_at >= :since
                     AND status IN ('completed', 'failed', 'cancelled'))
    UNION
    SELECT workspace_id, workflow_id FROM workflow_suggestions
    WHERE status IN ('open') AND source IN ('history')
    """
)


async def to_recompute(
    session: AsyncSession, now: datetime, window_days: int
) -> dict[uuid.UUID, list[uuid.UUID]]:
    """Workflow ids by workspace."""
    rows = await session.execute(TO_RECOMPUTE, {"since": now - timedelta(days=window_days)})
    out: dict[uuid.UUID, list[uuid.UUID]] = {}
    for workspace_id, workflow_id in rows.all():
        out.setdefault(workspace_id, []).append(workflow_id)
    return {ws: sorted(ids) for ws, ids in out.items()}


@dataclass
class WorkspaceFacts:
    """Read once per workspace per pass: every workflow's rules need them."""

    credential_names: dict[str, str] = field(default_factory=dict)
    # Credential id -> the workflows whose current version uses it.
    credential_users: dict[str, set[uuid.UUID]] = field(default_factory=dict)
    agent_models: dict[str, str] = field(default_factory=dict)


async def workspace_facts(session: AsyncSession, workspace_id: uuid.UUID) -> WorkspaceFacts:
    facts = WorkspaceFacts()
    creds = await session.execute(
        select(Credential.id, Credential.name).where(Credential.workspace_id == workspace_id)
    )
    facts.credential_names = {str(i): name for i, name in creds.all()}
    agents = await session.execute(
        select(Agent.id, Agent.model).where(Agent.workspace_id == workspace_id)
    )
    facts.agent_models = {str(i): model for i, model in agents.all()}
    rows = await session.execute(
        select(Workflow.id, WorkflowVersion.definition)
        .join(
            WorkflowVersion,
            (WorkflowVersion.workflow_id == Workflow.id)
            & (WorkflowVersion.number == Workflow.current_version),
        )
        .where(Workflow.workspace_id == workspace_id)
    )
    for workflow_id, definition in rows.all():
        for config in node_configs(definition):
            cred = config.get("credential_id")
            if cred:
                facts.credential_users.setdefault(str(cred), set()).add(workflow_id)
    return facts


async def history(
    session: AsyncSession,
    workflow_id: uuid.UUID,
    facts: WorkspaceFacts,
    *,
    now: datetime,
    window_days: int,
) -> History:
    params: dict[str, Any] = {
        "workflow_id": workflow_id,
        "since": now - timedelta(days=window_days),
    }
    runs = int(await session.scalar(RUNS, params) or 0)
    nodes: dict[str, NodeStats] = {}
    for row in (await session.execute(NODE_FIGURES, params)).mappings():
        nodes[row["node_id"]] = NodeStats(
            rows=row["rows"],
            completed=row["completed"],
            failed=row["failed"],
            timed=row["timed"],
            p95_ms=float(row["p95_ms"]) if row["p95_ms"] is not None else None,
            max_ms=float(row["max_ms"]) if row["max_ms"] is not None else None,
            cost_usd=float(row["cost_usd"]),
            runs_cost_usd=float(row["runs_cost_usd"]),
        )
    for node_id, cls, n in (await session.execute(FAILURES, params)).all():
        nodes.setdefault(node_id, NodeStats()).failures[cls] = int(n)
    for node_id, branch, n in (await session.execute(BRANCHES, params)).all():
        nodes.setdefault(node_id, NodeStats()).branches[branch] = int(n)
    return History(
        window_days=window_days,
        runs=runs,
        nodes=nodes,
        credential_names=facts.credential_names,
        shared_credentials=frozenset(
            cred for cred, users in facts.credential_users.items() if users - {workflow_id}
        ),
        agent_models=facts.agent_models,
    )
