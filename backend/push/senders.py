"""The two push channels, each a real protocol client sending through the SSRF-guarded
HTTP client (a subscription's endpoint is a URL someone gave us):

- Web Push: the payload encrypted per RFC 8291 (aes128gcm, pywebpush's encoder), the
  request authorised with a VAPID JWT (RFC 8292, py_vapid), POSTed to the browser's
  push service.
- FCM HTTP v1: an OAuth2 access token for the service account (google-auth, from the
  account's own token_uri), then `POST {endpoint}/v1/projects/{project}/messages:send`.

Each answers what became of the subscription: delivered, gone (404/410, FCM
UNREGISTERED: the caller deletes it) or failed (kept; the error is logged).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from backend.config import Settings
from backend.kit.logging import get_logger

log = get_logger(__name__)
Outcome = Literal["delivered", "gone", "failed", "off"]
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"


@dataclass(frozen=True, slots=True)
class Message:
    title: str
    body: str
    data: dict[str, str]


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


# Web Push ----------------------------------------------------------------------------------


def _vapid(settings: Settings) -> Any:
    from py_vapid import Vapid02  # type: ignore[import-untyped]

    key = settings.push.vapid_private_key
    assert key is not None
    raw = key.get_secret_value().strip()
    if "BEGIN" in raw:
        return Vapid02.from_pem(raw.encode())
    return Vapid02.from_string(raw)


async def web_push(
    settings: Settings, http: httpx.AsyncClient, subscription: dict[str, Any], message: Message
) -> Outcome:
    if settings.push.vapid_private_key is None:
        return "off"
    from pywebpush import WebPusher  # type: ignore[import-untyped]

    payload = json.dumps(
        {"title": message.title, "body": message.body, "data": message.data}
    ).encode()
    encoded = WebPusher(subscription).encode(payload, "aes128gcm")
    endpoint = str(subscription["endpoint"])
    claims = {
        "aud": origin_of(endpoint),
        "exp": int(time.time()) + 12 * 3600,
        "sub": settings.push.vapid_subject,
    }
    headers = {
        **_vapid(settings).sign(claims),
        "TTL": str(settings.push.ttl_s),
        "Content-Encoding": "aes128gcm",
        "Content-Type": "application/octet-stream",
        "Urgency": "normal",
    }
    try:
        response = await http.post(
            endpoint, content=encoded["body"], headers=headers, timeout=settings.push.timeout_s
        )
    except httpx.HTTPError as exc:
        log.warning("push.web_failed", origin=origin_of(endpoint), error=type(exc).__name__)
        return "failed"
    if response.status_code in (404, 410):
        return "gone"
    if response.status_code >= 300:
        log.warning("push.web_refused", origin=origin_of(endpoint), status=response.status_code)
        return "failed"
    return "delivered"


# FCM HTTP v1 -------------------------------------------------------------------------------


class _FcmTokens:
    """The service account's access token, refreshed when it nears expiry (google-auth
    is synchronous: the refresh runs in a thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._credentials: Any = None
        self._source: str | None = None

    def _refresh(self, info_json: str) -> str:
        import google.auth.transport.requests
        from google.oauth2 import service_account

        with self._lock:
            if self._credentials is None or self._source != info_json:
                info = json.loads(info_json)
                self._credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
                    info, scopes=[FCM_SCOPE]
                )
                self._source = info_json
            if not self._credentials.valid:
                self._credentials.refresh(google.auth.transport.requests.Request())
            return str(self._credentials.token)

    async def token(self, info_json: str) -> str:
        return await asyncio.to_thread(self._refresh, info_json)


_fcm_tokens = _FcmTokens()


def fcm_project(settings: Settings) -> str | None:
    if settings.push.fcm_project_id:
        return settings.push.fcm_project_id
    account = settings.push.fcm_service_account
    if account is None:
        return None
    try:
        project = json.loads(account.get_secret_value()).get("project_id")
    except ValueError:
        return None
    return str(project) if project else None


async def fcm_push(
    settings: Settings, http: httpx.AsyncClient, device_token: str, message: Message
) -> Outcome:
    account = settings.push.fcm_service_account
    project = fcm_project(settings)
    if account is None or project is None:
        return "off"
    try:
        access = await _fcm_tokens.token(account.get_secret_value())
    except Exception as exc:
        log.warning("push.fcm_token_failed", error=type(exc).__name__)
        return "failed"
    url = f"{settings.push.fcm_endpoint.rstrip('/')}/v1/projects/{project}/messages:send"
    body = {
        "message": {
            "token": device_token,
            "notification": {"title": message.title, "body": message.body},
            # FCM data values are strings.
            "data": message.data,
        }
    }
    try:
        response = await http.post(
            url,
            json=body,
            headers={"Authorization": f"Bearer {access}"},
            timeout=settings.push.timeout_s,
        )
    except httpx.HTTPError as exc:
        log.warning("push.fcm_failed", error=type(exc).__name__)
        return "failed"
    if response.status_code == 404 or (
        response.status_code == 400 and "UNREGISTERED" in response.text
    ):
        return "gone"
    if response.status_code >= 300:
        log.warning("push.fcm_refused", status=response.status_code)
        return "failed"
    return "delivered"
