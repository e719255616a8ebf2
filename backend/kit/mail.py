"""Outgoing mail: composed in the API, delivered by a worker (`notifications.send_email`
on the `default` queue), after the unit of work commits.

The body travels sealed with the encryption key, so a sign-in code or invitation link
is readable neither in Redis nor in Flower's task arguments.
"""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from typing import Any

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


def smtp_send(settings: Settings, message: EmailMessage) -> dict[str, Any]:
    """Send through the configured SMTP server (TLS or STARTTLS, login when set); the
    recipients the server refused, if it accepted some. smtplib's errors propagate:
    callers decide what is worth a retry."""
    smtp = settings.smtp
    assert smtp.host, "no SMTP host: callers log the message instead"
    context = ssl.create_default_context()
    client: smtplib.SMTP
    if smtp.use_tls:
        client = smtplib.SMTP_SSL(smtp.host, smtp.port, timeout=smtp.timeout_s, context=context)
    else:
        client = smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout_s)
    with client:
        if smtp.starttls and not smtp.use_tls:
            client.starttls(context=context)
        if smtp.username and smtp.password:
            client.login(smtp.username, smtp.password.get_secret_value())
        refused: dict[str, Any] = client.send_message(message)
    return refused
