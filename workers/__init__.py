"""Celery worker side: `celery -A workers worker|beat|flower` loads this package.

It exposes the shared app (as `app`, which Celery looks for) and imports the task
modules so they register. The API never imports this package.
"""

from typing import Any

from celery import signals

from backend.config import get_settings
from backend.kit.celery_app import celery_app as app
from backend.kit.logging import configure_logging


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    # Connecting here stops Celery from installing its own handlers: worker, beat and
    # Flower log through the same structlog pipeline as the API.
    configure_logging(get_settings())


from workers import tasks  # noqa: E402  (registers the tasks on `app`)

__all__ = ["app", "tasks"]
