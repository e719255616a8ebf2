"""Validated graphs, cached per process: a pinned version never changes, so it is
validated once (references are checked again by the nodes that use them)."""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.executions.lifecycle import Claim
from backend.kit.singleflight import SingleFlight
from backend.models import WorkflowVersion
from backend.triggers.hooks import remember_settings
from backend.workflows.graph import (
    LOOP_ROOTS,
    Context,
    ForEachLogic,
    GraphInvalid,
    ValidGraph,
    WhileLogic,
    node_configs,
    validate,
)
from backend.workflows.service import validation_context

CACHE_SIZE = 256
_graphs: OrderedDict[tuple[uuid.UUID, int], ValidGraph] = OrderedDict()
# The runs of a version that start together (a batch, a burst after a deploy) wait for
# one load and validation instead of each running it (measured: up to 32 concurrent
# misses per process in `make bench`'s throughput part).
_loading: SingleFlight[ValidGraph] = SingleFlight()


async def pinned_graph(sessionmaker: async_sessionmaker[AsyncSession], claim: Claim) -> ValidGraph:
    """The run's pinned version, validated; GraphInvalid when it no longer validates."""
    key = (claim.workflow_id, claim.version)
    cached = _graphs.get(key)
    if cached is not None:
        return cached
    return await _loading.do(key, lambda: _load(sessionmaker, claim))


async def _load(sessionmaker: async_sessionmaker[AsyncSession], claim: Claim) -> ValidGraph:
    async with sessionmaker() as session:
        definition = await session.scalar(
            select(WorkflowVersion.definition).where(
                WorkflowVersion.workflow_id == claim.workflow_id,
                WorkflowVersion.number == claim.version,
            )
        )
        if definition is None:
            raise GraphInvalid([])
        ctx = await validation_context(session, claim.workspace_id, claim.workflow_id)
    # In a thread: parsing a large definition's templates on the event loop stalled the
    # leases' heartbeats of every run this process holds (the reaper took them away).
    graph = await asyncio.to_thread(validate, definition, ctx)
    # The version's notification settings for the close hook (no read of its own).
    remember_settings(claim.workflow_id, claim.version, graph.settings)
    if len(_graphs) >= CACHE_SIZE:
        _graphs.popitem(last=False)
    _graphs[(claim.workflow_id, claim.version)] = graph
    return graph


def cached_graph(workflow_id: uuid.UUID, version: int) -> ValidGraph | None:
    """The pinned version's graph if this process has it (every running run's has)."""
    return _graphs.get((workflow_id, version))


def body_graph(
    graph: ValidGraph, parent: str, config: ForEachLogic | WhileLogic, workflow_id: uuid.UUID
) -> ValidGraph:
    """A loop's body graph, validated once and kept with the graph it belongs to."""
    bodies: dict[str, ValidGraph] = graph.graph.graph.setdefault("_bodies", {})
    body = bodies.get(parent)
    if body is None:
        assert config.body is not None
        raw = config.body.model_dump()
        # The parent's validation already checked the body's references against the
        # workspace (graph._check_references); an empty context here refused every agent,
        # credential or sub-workflow a body names, so such loops failed at run time.
        refs = _body_references(raw)
        body = validate(
            raw,
            Context(
                workflow_id=workflow_id,
                agent_ids=refs["agent_id"],
                credential_ids=refs["credential_id"],
                workflow_ids=refs["workflow_id"],
            ),
            require_trigger=False,
            extra_roots=LOOP_ROOTS[config.kind],
        )
        bodies[parent] = body
    return body


def _body_references(definition: dict[str, Any]) -> dict[str, frozenset[uuid.UUID]]:
    found: dict[str, set[uuid.UUID]] = {
        "agent_id": set(),
        "credential_id": set(),
        "workflow_id": set(),
    }
    for config in node_configs(definition):
        for name, ids in found.items():
            try:
                ids.add(uuid.UUID(str(config[name])))
            except (KeyError, ValueError):
                continue
    return {name: frozenset(ids) for name, ids in found.items()}
