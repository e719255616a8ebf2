"""Shapes of GET /workspaces/{id}/usage."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel

QuotaName = Literal[
    "runs_per_day",
    "concurrent_runs",
    "ai_tokens_per_month",
    "ai_cost_per_month_usd",
    "tool_calls_per_hour",
    "n8n_toggles_per_day",
    "n8n_refreshes_per_day",
]


class QuotaUsage(BaseModel):
    quota: QuotaName
    # The calendar period (UTC) the quota counts over; "concurrent": runs not yet ended.
    period: Literal["hour", "day", "month", "concurrent"]
    # None: unlimited.
    limit: float | None
    used: float
    remaining: float | None
    exceeded: bool
    # When the count starts again from zero (None for concurrent runs).
    resets_at: datetime | None


class WorkspaceUsage(BaseModel):
    workspace_id: str
    quotas: list[QuotaUsage]
