"""Mail delivery. SMTP when configured; otherwise (development, tests) the message is
written to the log, so `make run` works offline and a developer can read the code."""

from __future__ import annotations

import smtplib
from email.message import EmailMessage

from backend.config import Settings, get_settings
from backend.kit.celery_app import celery_app
from backend.kit.crypto import SecretBox
from backend.kit.logging import get_logger
from backend.kit.mail import smtp_send

log = get_logger(__name__)


def deliver(settings: Settings, to: str, subject: str, body: str) -> str:
    smtp = settings.smtp
    if not smtp.host:
        log.info("mail.console", to=to, subject=subject, body=body)
        return "console"
    message = EmailMessage()
    message["From"] = smtp.sender
    message["To"] = to
    message["Subject"] = subject
    message.set_content(body)
    smtp_send(settings, message)
    log.info("mail.sent", to=to, subject=subject)
    return "smtp"


@celery_app.task(
    name="notifications.send_email",
    autoretry_for=(smtplib.SMTPException, OSError),
    # A refused recipient will be refused again: no retry for that one.
    dont_autoretry_for=(smtplib.SMTPRecipientsRefused,),
    retry_backoff=5,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=5,
)
def send_email(to: str, subject: str, sealed_body: str) -> str:
    settings = get_settings()
    return deliver(settings, to, subject, SecretBox(settings).open(sealed_body))
