"""Workflow suggestions: recomputing the run-history ones (beat, or on request), listing,
accepting (the patch becomes a new version, validated, with optimistic concurrency on
the version it was made for) and dismissing.

A recompute keeps one row per finding (unique fingerprint per workflow): an open one is
brought up to date (figures, patch, base version), one whose finding is gone is deleted,
a dismissed one stays dismissed, an accepted one whose finding comes back (the patch was
reverted) is opened again. Suggestions from the model (source `model`) are left alone.
What changed is announced after commit on the workspace's channel (`workflows`) as
`workflow.suggestions`; accept and dismiss are in the activity log (and so announced
as `workflow.suggestion.accept` / `.dismiss`).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.activity.service import record
from backend.auth.dependencies import WorkspaceAccess
from backend.config import Settings
from backend.generate.schemas import Diff
from backend.generate.service import diff
from backend.kit.db import UnitOfWork
from backend.kit.errors import Conflict, NotFound, ValidationFailed
from backend.kit.logging import get_logger
from backend.models import Workflow, WorkflowSuggestion, WorkflowVersion
from backend.realtime.events import announce
from backend.suggestions import history as figures
from backend.suggestions import patch as patches
from backend.suggestions import rules
from backend.suggestions.schemas import AcceptResult, RefreshResult, SuggestionRead
from backend.workflows import service as workflows
from backend.workflows.graph import Context, GraphInvalid, validate
from backend.workflows.schemas import WorkflowUpdate

log = get_logger(__name__)
NOTICE = "workflow.suggestions"


@dataclass
class Changes:
    added: list[uuid.UUID] = field(default_factory=list)
    refreshed: int = 0
    resolved: int = 0

    @property
    def any(self) -> bool:
        return bool(self.added or self.resolved)


async def _lock(session: AsyncSession, workflow_id: uuid.UUID) -> None:
    # Two recomputes of one workflow (beat and a refresh) take turns instead of both
    # inserting the same new finding.
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
        {"key": f"suggestions:{workflow_id}"},
    )


def checked(
    definition: dict[str, Any], ops: list[dict[str, Any]], ctx: Context
) -> dict[str, Any] | None:
    """The patched definition as the validator stores it, or None when the patch does not
    apply, does not validate, or changes nothing."""
    try:
        after = validate(patches.apply(definition, ops), ctx).definition
    except (patches.PatchError, GraphInvalid):
        return None
    return after if after != definition else None


async def recompute(
    session: AsyncSession,
    workflow: Workflow,
    settings: Settings,
    *,
    facts: figures.WorkspaceFacts | None = None,
    ctx: Context | None = None,
    now: datetime | None = None,
) -> Changes:
    """Bring the workflow's run-history suggestions up to date, in the caller's
    transaction; announce what changed once it commits."""
    await _lock(session, workflow.id)
    now = now or datetime.now(UTC)
    facts = facts or await figures.workspace_facts(session, workflow.workspace_id)
    if ctx is None:
        ctx = await workflows.validation_context(session, workflow.workspace_id, workflow.id)
    ctx = dataclasses.replace(ctx, workflow_id=workflow.id)
    definition = await session.scalar(
        select(WorkflowVersion.definition).where(
            WorkflowVersion.workflow_id == workflow.id,
            WorkflowVersion.number == workflow.current_version,
        )
    )
    if definition is None:
        # No definition to patch (a row written without its version, as bulk imports
        # and test fixtures do): nothing to suggest, and no reason to fail the pass.
        return Changes()
    hist = await figures.history(
        session,
        workflow.id,
        facts,
        now=now,
        window_days=settings.generate.suggestions_window_days,
    )
    found = {}
    for finding in rules.evaluate(definition, hist, settings):
        if checked(definition, finding.patch, ctx) is None:
            # A patch that would not validate (a template reads a node it removes) is
            # no suggestion: accepting it could only fail.
            log.info("suggestions.patch_invalid", workflow_id=str(workflow.id), kind=finding.kind)
            continue
        found[finding.fingerprint] = finding
    existing = {
        s.fingerprint: s
        for s in (
            await session.scalars(
                select(WorkflowSuggestion)
                .where(
                    WorkflowSuggestion.workflow_id == workflow.id,
                    WorkflowSuggestion.source == "history",
                )
                .with_for_update()
            )
        ).all()
    }
    changes = Changes()
    for fingerprint, finding in found.items():
        row = existing.get(fingerprint)
        content = {
            "kind": finding.kind,
            "reason": finding.reason,
            "evidence": finding.evidence,
            "patch": finding.patch,
            "base_version": workflow.current_version,
        }
        if row is None:
            row = WorkflowSuggestion(
                workspace_id=workflow.workspace_id,
                workflow_id=workflow.id,
                fingerprint=fingerprint,
                source="history",
                status="open",
                **content,
            )
            session.add(row)
            await session.flush()
            changes.added.append(row.id)
        elif row.status == "dismissed":
            continue
        elif row.status == "accepted":
            # Found again after it was accepted: the patch was undone or did not help.
            for key, value in content.items():
                setattr(row, key, value)
            row.status, row.decided_by, row.decided_at = "open", None, None
            changes.added.append(row.id)
        elif any(getattr(row, key) != value for key, value in content.items()):
            for key, value in content.items():
                setattr(row, key, value)
            changes.refreshed += 1
    gone = [s.id for f, s in existing.items() if f not in found and s.status == "open"]
    if gone:
        await session.execute(delete(WorkflowSuggestion).where(WorkflowSuggestion.id.in_(gone)))
        changes.resolved = len(gone)
    await session.flush()
    if changes.any:
        open_count = await session.scalar(
            select(func.count()).where(
                WorkflowSuggestion.workflow_id == workflow.id, WorkflowSuggestion.status == "open"
            )
        )
        announce(
            session,
            workflow.workspace_id,
            {
                "type": NOTICE,
                "workspace_id": str(workflow.workspace_id),
                "resource_type": "workflow",
                "resource_id": str(workflow.id),
                "actor": None,
                "data": {
                    "added": [str(i) for i in changes.added],
                    "resolved": changes.resolved,
                    "open": int(open_count or 0),
                },
            },
        )
    return changes


async def recompute_pass(
    sessionmaker: async_sessionmaker[AsyncSession], settings: Settings, now: datetime
) -> dict[str, int]:
    """Beat: every workflow with finished runs in the window, or with open run-history
    suggestions (whose findings may be gone), one transaction each; a workflow that
    fails is logged and the pass goes on."""
    async with sessionmaker() as session:
        by_workspace = await figures.to_recompute(
            session, now, settings.generate.suggestions_window_days
        )
    totals = {"workflows": 0, "added": 0, "resolved": 0, "failed": 0}
    for workspace_id, workflow_ids in by_workspace.items():
        async with sessionmaker() as session:
            facts = await figures.workspace_facts(session, workspace_id)
            ctx = await workflows.validation_context(session, workspace_id, None)
        for workflow_id in workflow_ids:
            try:
                async with UnitOfWork(sessionmaker) as uow:
                    workflow = await uow.session.get(Workflow, workflow_id)
                    if workflow is None:
                        continue
                    changes = await recompute(
                        uow.session, workflow, settings, facts=facts, ctx=ctx, now=now
                    )
            except Exception:
                log.exception("suggestions.recompute_failed", workflow_id=str(workflow_id))
                totals["failed"] += 1
                continue
            totals["workflows"] += 1
            totals["added"] += len(changes.added)
            totals["resolved"] += changes.resolved
    return totals


# Reading -----------------------------------------------------------------------------------


async def _definitions(
    session: AsyncSession, workflow_id: uuid.UUID, numbers: set[int]
) -> dict[int, dict[str, Any]]:
    if not numbers:
        return {}
    rows = await session.execute(
        select(WorkflowVersion.number, WorkflowVersion.definition).where(
            WorkflowVersion.workflow_id == workflow_id, WorkflowVersion.number.in_(numbers)
        )
    )
    return {number: definition for number, definition in rows.all()}


async def to_read(
    session: AsyncSession, workflow: Workflow, rows: Sequence[WorkflowSuggestion]
) -> list[SuggestionRead]:
    bases = await _definitions(session, workflow.id, {r.base_version for r in rows})
    out = []
    for row in rows:
        base = bases.get(row.base_version)
        change: Diff | None = None
        if base is not None and row.status == "open":
            try:
                change = diff(base, patches.apply(base, row.patch))
            except patches.PatchError:
                change = None
        read = SuggestionRead.model_validate(row)
        read.stale = row.status == "open" and row.base_version != workflow.current_version
        read.diff = change
        out.append(read)
    return out


async def list_suggestions(
    uow: UnitOfWork,
    access: WorkspaceAccess,
    *,
    status: str | None,
    kind: str | None,
    source: str | None,
    limit: int,
    offset: int,
) -> tuple[list[SuggestionRead], int]:
    workflow: Workflow = access.resource
    stmt = select(WorkflowSuggestion).where(WorkflowSuggestion.workflow_id == workflow.id)
    if status is not None:
        stmt = stmt.where(WorkflowSuggestion.status == status)
    if kind is not None:
        stmt = stmt.where(WorkflowSuggestion.kind == kind)
    if source is not None:
        stmt = stmt.where(WorkflowSuggestion.source == source)
    total = await uow.session.scalar(select(func.count()).select_from(stmt.subquery()))
    rows = (
        await uow.session.scalars(
            stmt.order_by(WorkflowSuggestion.created_at.desc(), WorkflowSuggestion.id)
            .limit(limit)
            .offset(offset)
        )
    ).all()
    return await to_read(uow.session, workflow, rows), int(total or 0)


async def _suggestion(
    session: AsyncSession, workflow: Workflow, suggestion_id: uuid.UUID, *, lock: bool = False
) -> WorkflowSuggestion:
    stmt = select(WorkflowSuggestion).where(
        WorkflowSuggestion.id == suggestion_id, WorkflowSuggestion.workflow_id == workflow.id
    )
    row = await session.scalar(stmt.with_for_update() if lock else stmt)
    if row is None:
        raise NotFound("suggestion not found")
    return row


async def get(uow: UnitOfWork, access: WorkspaceAccess, suggestion_id: uuid.UUID) -> SuggestionRead:
    row = await _suggestion(uow.session, access.resource, suggestion_id)
    return (await to_read(uow.session, access.resource, [row]))[0]


async def refresh(uow: UnitOfWork, access: WorkspaceAccess, settings: Settings) -> RefreshResult:
    workflow: Workflow = access.resource
    changes = await recompute(uow.session, workflow, settings)
    rows = (
        await uow.session.scalars(
            select(WorkflowSuggestion)
            .where(
                WorkflowSuggestion.workflow_id == workflow.id, WorkflowSuggestion.status == "open"
            )
            .order_by(WorkflowSuggestion.created_at.desc(), WorkflowSuggestion.id)
        )
    ).all()
    return RefreshResult(
        added=len(changes.added),
        refreshed=changes.refreshed,
        resolved=changes.resolved,
        items=await to_read(uow.session, workflow, rows),
    )


# Deciding ----------------------------------------------------------------------------------


def _still_open(row: WorkflowSuggestion) -> None:
    if row.status != "open":
        raise Conflict(f"the suggestion is already {row.status}", field="status", status=row.status)


async def accept(
    uow: UnitOfWork, access: WorkspaceAccess, suggestion_id: uuid.UUID
) -> AcceptResult:
    session = uow.session
    workflow: Workflow = access.resource
    row = await _suggestion(session, workflow, suggestion_id, lock=True)
    _still_open(row)
    base = (await workflows.get_version(uow, access, row.base_version)).definition
    try:
        patched = patches.apply(base, row.patch)
    except patches.PatchError as exc:
        raise ValidationFailed(f"the patch does not apply: {exc}", field="patch") from exc
    try:
        saved = await workflows.update(
            uow,
            access,
            WorkflowUpdate(
                nodes=patched["nodes"],
                connections=patched["connections"],
                settings=patched["settings"],
                version=row.base_version,
            ),
            None,
        )
    except Conflict as exc:
        current = exc.extra.get("current_version")
        raise Conflict(
            f"the suggestion was made for version {row.base_version} and the workflow is at "
            f"version {current}; refresh the suggestions (POST .../suggestions/refresh)",
            field="base_version",
            current_version=current,
            base_version=row.base_version,
        ) from exc
    if saved.version == row.base_version:
        raise Conflict("the patch changes nothing in this version", field="patch")
    row.status = "accepted"
    row.decided_by = access.user.id
    row.decided_at = datetime.now(UTC)
    await session.flush()
    record(
        session,
        access.principal,
        workspace_id=workflow.workspace_id,
        action="workflow.suggestion.accept",
        resource_type="workflow",
        resource_id=workflow.id,
        details={
            "suggestion_id": str(row.id),
            "kind": row.kind,
            "source": row.source,
            "base_version": row.base_version,
            "version": saved.version,
        },
    )
    await session.refresh(workflow)
    read = (await to_read(session, workflow, [row]))[0]
    return AcceptResult(suggestion=read, workflow=saved)


async def dismiss(
    uow: UnitOfWork, access: WorkspaceAccess, suggestion_id: uuid.UUID
) -> SuggestionRead:
    session = uow.session
    workflow: Workflow = access.resource
    row = await _suggestion(session, workflow, suggestion_id, lock=True)
    _still_open(row)
    row.status = "dismissed"
    row.decided_by = access.user.id
    row.decided_at = datetime.now(UTC)
    await session.flush()
    record(
        session,
        access.principal,
        workspace_id=workflow.workspace_id,
        action="workflow.suggestion.dismiss",
        resource_type="workflow",
        resource_id=workflow.id,
        details={"suggestion_id": str(row.id), "kind": row.kind, "source": row.source},
    )
    return (await to_read(session, workflow, [row]))[0]
