"""Celery tasks: thin adapters that take ids and JSON primitives and call services."""

from workers.tasks import executions, maintenance, notifications, system, triggers

__all__ = ["executions", "maintenance", "notifications", "system", "triggers"]
