"""Tasks only tests load into a real worker (`celery worker --include`): something that
is still running when the test breaks the broker connection under it."""

from __future__ import annotations

import time

from backend.kit.celery_app import celery_app


@celery_app.task(name="test.sleep", ignore_result=False)
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds
