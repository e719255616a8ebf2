"""Celery tasks: thin adapters that take ids and JSON primitives and call services."""

from workers.tasks import (
    analytics,
    executions,
    inbox,
    maintenance,
    n8n,
    n8n_envs,
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
    "n8n",
    "n8n_envs",
    "notifications",
    "suggestions",
    "system",
    "triggers",
]
