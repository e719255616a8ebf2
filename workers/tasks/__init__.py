"""Celery tasks: thin adapters that take ids and JSON primitives and call services."""

from workers.tasks import system

__all__ = ["system"]
