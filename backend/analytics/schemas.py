"""Shapes of the analytics API's answers (all times UTC, durations in ms)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel

Granularity = Literal["hour", "day", "week", "month"]


class WindowRead(BaseModel):
    since: datetime
    until: datetime
    granularity: Granularity


class ByStatus(BaseModel):
    pending: int
    running: int
    completed: int
    failed: int
    cancelled: int


class Latency(BaseModel):
    """Percentiles come from log-scale histograms: within +-12 % of the exact value."""

    mean: float | None
    p50: float | None
    p95: float | None
    p99: float | None


class Tokens(BaseModel):
    input: int
    output: int
    cache_read: int
    cache_write: int


class Stats(BaseModel):
    runs: int
    by_status: ByStatus
    # completed / (completed + failed + cancelled); None before any run ended.
    success_rate: float | None
    duration_ms: Latency
    # Created -> claimed by a worker.
    queue_wait_ms: Latency
    retries: int
    tokens: Tokens
    cost_usd: float


class Point(Stats):
    period: datetime


class Breakdown(Stats):
    """For node types, models and agents, `runs` counts node attempts (calls)."""

    key: str
    name: str | None = None


class FailingNode(BaseModel):
    workflow_id: str
    node_id: str
    failures: int
    error_classes: dict[str, int]


class Overview(BaseModel):
    window: WindowRead
    totals: Stats
    series: list[Point]
    top_failing_nodes: list[FailingNode]
    by_model: list[Breakdown]


class WorkflowAnalytics(BaseModel):
    window: WindowRead
    workflow_id: str
    totals: Stats
    series: list[Point]
    top_failing_nodes: list[FailingNode]


class Performance(BaseModel):
    window: WindowRead
    totals: Stats
    series: list[Point]
    by_workflow: list[Breakdown]
    by_node_type: list[Breakdown]


class Usage(BaseModel):
    window: WindowRead
    totals: Stats
    series: list[Point]
    by_workflow: list[Breakdown]
    by_model: list[Breakdown]
    by_agent: list[Breakdown]


class CostPoint(BaseModel):
    period: datetime
    runs: int
    tokens: Tokens
    cost_usd: float


class CostItem(BaseModel):
    key: str
    name: str | None = None
    runs: int
    tokens: Tokens
    cost_usd: float


class Costs(BaseModel):
    window: WindowRead
    cost_usd: float
    tokens: Tokens
    series: list[CostPoint]
    by_model: list[CostItem]
    by_agent: list[CostItem]
    by_workflow: list[CostItem]
