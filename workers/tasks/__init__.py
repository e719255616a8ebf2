"""Celery tasks: thin adapters that take ids and JSON primitives and call services."""

from workers.tasks import (
    analytics,
    executions,
    inbox,
    maintenance,
    notifications,
    suggestions,
    system,
    triggers,
)

__all__ = [
    "analytics",
    "executions",
    "inbox",
    "maintenance",
    "notifications",
    "suggestions",
    "system",
    "triggers",
]
