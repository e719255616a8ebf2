"""Workflow templates a workspace published for its members, and improvement
suggestions for a workflow (from its run history or from the model)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import RecordModel


class WorkflowTemplate(RecordModel):
    __tablename__ = "workflow_templates"
    __table_args__ = (UniqueConstraint("workspace_id", "name"),)

    workspace_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, server_default=text("''"))
    category: Mapped[str] = mapped_column(String(50), server_default=text("'custom'"))
    # A copy taken at publish time: later edits of the workflow do not change it.
    definition: Mapped[dict[str, Any]]
    # [{name, kind: agent|credential|text, field paths...}], see templates_library.
    parameters: Mapped[list[dict[str, Any]]] = mapped_column(server_default=text("'[]'::jsonb"))
    source_workflow_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("workflows.id", ondelete="SET NULL")
    )
    created_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )


class WorkflowSuggestion(RecordModel):
    __tablename__ = "workflow_suggestions"
    __table_args__ = (
        # One suggestion per finding: a recompute refreshes it instead of adding another.
        UniqueConstraint("workflow_id", "fingerprint"),
        CheckConstraint("status IN ('open', 'accepted', 'dismissed')", name="status"),
    )

    workspace_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    workflow_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workflows.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(40))
    fingerprint: Mapped[str] = mapped_column(String(300))
    source: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str] = mapped_column(Text)
    evidence: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    # Operations on the definition (see backend/suggestions/patch.py).
    patch: Mapped[list[dict[str, Any]]] = mapped_column(server_default=text("'[]'::jsonb"))
    # The version the patch was computed against: accepting it needs that version.
    base_version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), server_default=text("'open'"))
    decided_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    decided_at: Mapped[datetime | None]
