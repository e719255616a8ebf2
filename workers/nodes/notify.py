"""notify nodes: an email through the configured SMTP server, or a JSON webhook through
the SSRF guard, signed Standard Webhooks style when the node names a webhook_secret
credential.

Both are delivered inline, while the node runs: the node completes only once the mail
server or the receiver accepted the message, and a transient refusal (SMTP 4xx, a
dropped connection, HTTP 429/5xx) goes through the node's own retry policy.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import smtplib
import ssl
import uuid
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import make_msgid, parseaddr
from typing import Any

import httpx
from email_validator import EmailNotValidError, validate_email

from backend.config import Settings
from backend.kit.http_guard import BlockedAddress
from backend.kit.logging import get_logger
from backend.kit.mail import smtp_send
from backend.kit.signing import ID_HEADER, sign
from backend.workflows.graph import NotifyAction
from workers.engine.retry import ErrorClass, NodeFailure, classify_status
from workers.nodes.base import NodeContext, NodeResult

log = get_logger(__name__)

MAX_RECIPIENTS = 50
# Enough of a refusal's body to tell a spend/quota 429 from a passing one.
ERROR_BODY_BYTES = 2000


async def run(ctx: NodeContext, config: NotifyAction) -> NodeResult:
    if config.channel == "email":
        return await email(ctx, config)
    return await webhook(ctx, config)


# Email ------------------------------------------------------------------------------------


def _recipients(rendered: Any) -> list[str]:
    items = rendered if isinstance(rendered, list) else re.split(r"[,;]", str(rendered))
    out: list[str] = []
    for item in items:
        raw = str(item).strip()
        if not raw:
            continue
        # "Ada <ada@example.com>" keeps working; the address alone is what we check.
        address = parseaddr(raw)[1] or raw
        try:
            out.append(validate_email(address, check_deliverability=False).normalized)
        except EmailNotValidError as exc:
            raise NodeFailure(
                f"to: {address!r} is not an email address: {exc}", "permanent"
            ) from None
    if not out:
        raise NodeFailure("to: the rendered recipient list is empty", "permanent")
    if len(out) > MAX_RECIPIENTS:
        raise NodeFailure(f"to: more than {MAX_RECIPIENTS} recipients", "permanent")
    return out


async def email(ctx: NodeContext, config: NotifyAction) -> NodeResult:
    if config.credential_id is not None:
        raise NodeFailure(
            "credential_id: only webhook notifications use a credential (email goes "
            "through the operator's SMTP settings)",
            "permanent",
        )
    assert config.to is not None  # NotifyAction's validator insists
    to = _recipients(ctx.render_json(config.to))
    # A subject is one header line: newlines a template left in are folded to spaces.
    subject = " ".join(ctx.render(config.subject).split())
    smtp = ctx.settings.smtp
    message = EmailMessage()
    message["From"] = smtp.sender
    message["To"] = ", ".join(to)
    message["Subject"] = subject
    domain = parseaddr(smtp.sender)[1].rpartition("@")[2] or None
    message_id = make_msgid(domain=domain)
    message["Message-ID"] = message_id
    message.set_content(ctx.render(config.message))
    # smtplib blocks; a thread keeps the run's other nodes moving. The SMTP timeout
    # bounds the thread even when the node's own timeout gives up on it first.
    refused = await asyncio.to_thread(_send, ctx.settings, message)
    output: dict[str, Any] = {"channel": "email", "to": to, "message_id": message_id}
    if refused:
        output["refused"] = sorted(refused)
    return NodeResult(output=output)


def _send(settings: Settings, message: EmailMessage) -> dict[str, Any]:
    smtp = settings.smtp
    if not smtp.host:
        # Development only (the settings refuse an unset host elsewhere), as for the
        # sign-in mail: the developer reads the message in the worker's log.
        log.info(
            "notify.console",
            to=message["To"],
            subject=message["Subject"],
            body=message.get_content(),
        )
        return {}
    try:
        refused = smtp_send(settings, message)
    except smtplib.SMTPRecipientsRefused as exc:
        raise NodeFailure(
            f"the mail server refused every recipient: {', '.join(sorted(exc.recipients))}",
            "permanent",
        ) from None
    except smtplib.SMTPResponseException as exc:
        text = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else ""
        # SMTP's 4xx means "try again later"; 5xx will be refused again.
        cls: ErrorClass = "server_error" if 400 <= exc.smtp_code < 500 else "permanent"
        raise NodeFailure(f"the mail server answered {exc.smtp_code}: {text[:200]}", cls) from None
    except smtplib.SMTPServerDisconnected:
        raise NodeFailure("the mail server closed the connection", "connection") from None
    except smtplib.SMTPException as exc:
        raise NodeFailure(f"mail not sent: {exc}", "permanent") from None
    except ssl.SSLCertVerificationError as exc:
        raise NodeFailure(
            f"the mail server's certificate: {exc.verify_message}", "permanent"
        ) from None
    except TimeoutError:
        raise NodeFailure("the mail server did not answer in time", "timeout") from None
    except OSError as exc:
        raise NodeFailure(
            f"the mail server is unreachable: {exc.strerror or exc}", "connection"
        ) from None
    log.info("notify.email.sent", to=message["To"], message_id=message["Message-ID"])
    return refused


# Webhook ----------------------------------------------------------------------------------


def _message_id(ctx: NodeContext) -> str:
    """The same for every attempt of one delivery, so a receiver can drop a duplicate
    (Standard Webhooks' webhook-id); different per loop pass. Derived from the node
    execution's idempotency key, the one HTTP nodes send, so both name a node execution
    the same way (the loop's own key and pass, not the body's scope)."""
    return "msg_" + hashlib.sha256(ctx.idempotency_key.encode()).hexdigest()[:32]


async def _signing_secret(ctx: NodeContext, credential_id: uuid.UUID) -> str:
    secret = await ctx.secret(credential_id)
    if secret.get("type") != "webhook_secret":
        raise NodeFailure(
            f"credential type {secret.get('type')!r} cannot sign webhooks; "
            "use a webhook_secret credential",
            "permanent",
        )
    value: str = secret["secret"]
    return value


async def webhook(ctx: NodeContext, config: NotifyAction) -> NodeResult:
    assert config.url is not None  # NotifyAction's validator insists
    url = ctx.render(config.url)
    execution = ctx.scope.get("execution") or {}
    payload = {
        "type": "workflow.notify",
        "execution_id": str(ctx.execution_id),
        "workflow_id": execution.get("workflow_id"),
        "node_id": ctx.node.id,
        "subject": ctx.render(config.subject),
        "message": ctx.render(config.message),
        "timestamp": datetime.now(UTC).isoformat(),
    }
    body = json.dumps(payload, separators=(",", ":")).encode()
    message_id = _message_id(ctx)
    headers = {"Content-Type": "application/json", ID_HEADER: message_id}
    if config.credential_id is not None:
        # Signed over the exact bytes sent; the secret itself goes nowhere but HMAC.
        headers.update(
            sign(await _signing_secret(ctx, config.credential_id), body, message_id=message_id)
        )
    try:
        request = ctx.http.build_request("POST", url, headers=headers, content=body)
        response = await ctx.http.send(request, stream=True)
    except BlockedAddress as exc:
        raise NodeFailure(str(exc), "permanent") from None
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise NodeFailure(f"invalid webhook URL: {exc}", "permanent") from None
    try:
        snippet = b""
        if response.status_code >= 400:
            async for chunk in response.aiter_bytes():
                snippet += chunk
                if len(snippet) >= ERROR_BODY_BYTES:
                    break
    finally:
        await response.aclose()
    status = response.status_code
    if response.is_redirect:
        # A signed delivery is for the URL it was configured for; following a redirect
        # would hand it (and a POST body) to wherever the receiver points.
        raise NodeFailure(
            f"the webhook answered a redirect ({status}); use the final URL", "permanent"
        )
    if status >= 400:
        retry_after = response.headers.get("retry-after")
        raise NodeFailure(
            f"the webhook answered HTTP {status}",
            classify_status(status, snippet[:ERROR_BODY_BYTES].decode(errors="replace")),
            float(retry_after) if retry_after and retry_after.isdigit() else None,
        )
    return NodeResult(output={"channel": "webhook", "status": status, "message_id": message_id})
