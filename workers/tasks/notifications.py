"""Mail delivery. SMTP when configured; otherwise (development, tests) the message is
written to the log, so `make run` works offline and a developer can read the code."""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage

from backend.config import Settings, get_settings
from backend.kit.celery_app import celery_app
from backend.kit.crypto import SecretBox
from backend.kit.logging import get_logger

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
        client.send_message(message)
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
