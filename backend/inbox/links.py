"""One-time links: the signed tokens behind a task's e-mailed approve/reject links and a
wait step's resume URL. Pure (HMAC under SECURITY__SECRET_KEY); single use is the
database's business (`action_links.used_at`).

- A decision link is `d.<link id>.<mac>`, the MAC over the link id, its task, its person
  and its expiry, so a row whose bindings were changed no longer matches its token.
- A resume token is `r.<execution id>.<iteration>.<node id>.<mac>`: deterministic, so
  the URL can be handed out before its wait step runs (`execution.resume_urls`), and
  minted only by this server.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from dataclasses import dataclass
from datetime import datetime

from backend.config import Settings

RESUME_PATH = "/api/v1/resume/"
DECIDE_PATH = "/api/v1/task-links/"


class BadLink(ValueError):
    """The token is not one this server made (or is malformed)."""


def _mac(settings: Settings, message: str) -> str:
    key = settings.security.secret_key.get_secret_value().encode()
    digest = hmac.new(key, message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _check(settings: Settings, message: str, mac: str) -> None:
    if not hmac.compare_digest(_mac(settings, message).encode(), mac.encode()):
        raise BadLink("this link is not valid")


# Resume URLs -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResumeTarget:
    execution_id: uuid.UUID
    node_id: str
    iteration: int


def resume_token(settings: Settings, execution_id: uuid.UUID, node_id: str, iteration: int) -> str:
    body = f"{execution_id.hex}.{iteration}.{node_id}"
    return f"r.{body}.{_mac(settings, 'resume|' + body)}"


def resume_url(settings: Settings, execution_id: uuid.UUID, node_id: str, iteration: int) -> str:
    base = settings.tasks.public_url.rstrip("/")
    return base + RESUME_PATH + resume_token(settings, execution_id, node_id, iteration)


def read_resume_token(settings: Settings, token: str) -> ResumeTarget:
    parts = token.split(".")
    if len(parts) != 5 or parts[0] != "r" or len(token) > 400:
        raise BadLink("this link is not valid")
    _, run_hex, raw_iteration, node_id, mac = parts
    _check(settings, f"resume|{run_hex}.{raw_iteration}.{node_id}", mac)
    try:
        return ResumeTarget(uuid.UUID(hex=run_hex), node_id, int(raw_iteration))
    except ValueError:
        raise BadLink("this link is not valid") from None


# Decision links ------------------------------------------------------------------------------


def _decide_message(
    link_id: uuid.UUID, task_id: uuid.UUID, user_id: uuid.UUID, expires_at: datetime
) -> str:
    return f"decide|{link_id}|{task_id}|{user_id}|{int(expires_at.timestamp())}"


def decide_token(
    settings: Settings,
    link_id: uuid.UUID,
    task_id: uuid.UUID,
    user_id: uuid.UUID,
    expires_at: datetime,
) -> str:
    mac = _mac(settings, _decide_message(link_id, task_id, user_id, expires_at))
    return f"d.{link_id.hex}.{mac}"


def decide_url(settings: Settings, token: str) -> str:
    return settings.tasks.public_url.rstrip("/") + DECIDE_PATH + token


def decide_link_id(token: str) -> tuple[uuid.UUID, str]:
    """(link id, mac) from a decision token; the MAC is checked against the row."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != "d" or len(token) > 200:
        raise BadLink("this link is not valid")
    try:
        return uuid.UUID(hex=parts[1]), parts[2]
    except ValueError:
        raise BadLink("this link is not valid") from None


def check_decide(
    settings: Settings,
    mac: str,
    link_id: uuid.UUID,
    task_id: uuid.UUID,
    user_id: uuid.UUID,
    expires_at: datetime,
) -> None:
    _check(settings, _decide_message(link_id, task_id, user_id, expires_at), mac)
