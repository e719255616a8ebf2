"""Outgoing mail: composed in the API, delivered by a worker (`notifications.send_email`
on the `default` queue), after the unit of work commits.

The body travels sealed with the encryption key, so a sign-in code or invitation link
is readable neither in Redis nor in Flower's task arguments.
"""

from __future__ import annotations

from backend.config import Settings
from backend.kit.crypto import SecretBox
from backend.kit.db import UnitOfWork
from backend.kit.tasks import enqueue_after_commit

SEND_EMAIL_TASK = "notifications.send_email"


def send_mail(uow: UnitOfWork, settings: Settings, *, to: str, subject: str, body: str) -> None:
    sealed = SecretBox(settings).seal(body)
    enqueue_after_commit(
        uow, SEND_EMAIL_TASK, to, subject, sealed, argsrepr=f"({to!r}, {subject!r}, '<sealed>')"
    )
