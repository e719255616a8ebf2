"""Celery tasks: thin adapters that take ids and JSON primitives and call services."""

from workers.tasks import notifications, system

__all__ = ["notifications", "system"]
