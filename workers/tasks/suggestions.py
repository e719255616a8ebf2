"""`suggestions.recompute` (beat, `default` queue): bring every workflow's run-history
suggestions up to date and announce what changed on its workspace's `workflows` channel.
Safe to run twice or in parallel: one row per finding, and a per-workflow lock."""

from __future__ import annotations

from datetime import UTC, datetime

from backend.config import get_settings
from backend.kit.celery_app import celery_app
from backend.kit.logging import get_logger
from backend.suggestions.service import recompute_pass
from workers.tasks.executions import process

log = get_logger(__name__)


@celery_app.task(name="suggestions.recompute")
def recompute() -> dict[str, int]:
    p = process()
    totals = p.run(recompute_pass(p.sessionmaker, get_settings(), datetime.now(UTC)))
    log.info("suggestions.recompute", **totals)
    return totals
