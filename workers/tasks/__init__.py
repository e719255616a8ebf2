"""Celery tasks: thin adapters that take ids and JSON primitives and call services."""

from workers.tasks import executions, notifications, system

__all__ = ["executions", "notifications", "system"]
