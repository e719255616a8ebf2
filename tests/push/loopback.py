"""Loopback push services on 127.0.0.1, checking what a real one checks:

- a Web Push service: the VAPID JWT (RFC 8292: ES256 under the key in `k=`, audience
  this origin, not expired, a subject) and the RFC 8291 aes128gcm body, decrypted with
  the browser's own private key and auth secret (so the test reads what a browser
  would); answers 201, or 410 for an endpoint marked gone;
- an FCM HTTP v1 endpoint and its OAuth2 token endpoint: the token request is a
  JWT-bearer grant signed RS256 by the service account's key; messages need that token;
  a device token starting with `gone` answers 404 UNREGISTERED.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import http_ece  # type: ignore[import-untyped]
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def vapid_keys() -> tuple[str, str]:
    """(private key PEM, public key base64url) for PUSH__VAPID_*."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return pem, b64url(public)


@dataclass
class Browser:
    """A browser's side of a subscription: its key pair and auth secret."""

    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    auth: bytes = field(default_factory=lambda: secrets.token_bytes(16))

    def keys(self) -> dict[str, str]:
        public = self.key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return {"p256dh": b64url(public), "auth": b64url(self.auth)}


@dataclass
class PushService:
    base: str
    browsers: dict[str, Browser] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)
    # What arrived: (endpoint id, decrypted payload, VAPID claims).
    received: list[tuple[str, dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    # FCM
    fcm_messages: list[dict[str, Any]] = field(default_factory=list)
    access_tokens: set[str] = field(default_factory=set)
    service_key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )

    def subscription(self, name: str) -> dict[str, Any]:
        browser = self.browsers.setdefault(name, Browser())
        return {"endpoint": f"{self.base}/push/{name}", "keys": browser.keys()}

    def service_account(self) -> dict[str, str]:
        pem = self.service_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return {
            "type": "service_account",
            "project_id": "demo-project",
            "private_key_id": "k1",
            "private_key": pem,
            "client_email": "push@demo-project.iam.gserviceaccount.com",
            "client_id": "1",
            "token_uri": f"{self.base}/token",
        }

    def wait_for(self, count: int, timeout_s: float = 15) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(self.received) + len(self.fcm_messages) >= count:
                return
            time.sleep(0.05)
        raise AssertionError(f"{count} pushes expected, got {self.received}, {self.fcm_messages}")


def _handler(service: PushService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def _answer(self, status: int, body: dict[str, Any] | None = None) -> None:
            data = json.dumps(body or {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.startswith("/push/"):
                self._web_push(self.path.removeprefix("/push/"), raw)
            elif self.path == "/token":
                self._token(raw)
            elif self.path.startswith("/v1/projects/"):
                self._fcm(raw)
            else:
                self._answer(404)

        def _web_push(self, name: str, raw: bytes) -> None:
            if name in service.gone:
                self._answer(410)
                return
            try:
                scheme, _, params = self.headers["Authorization"].partition(" ")
                assert scheme == "vapid", "not a VAPID authorization"
                parts = dict(p.strip().split("=", 1) for p in params.split(","))
                public = ec.EllipticCurvePublicKey.from_encoded_point(
                    ec.SECP256R1(), unb64url(parts["k"])
                )
                claims = jwt.decode(parts["t"], public, algorithms=["ES256"], audience=service.base)
                assert claims["exp"] > time.time() and claims["sub"]
                assert self.headers["Content-Encoding"] == "aes128gcm"
                assert int(self.headers["TTL"]) >= 0
                browser = service.browsers[name]
                plain = http_ece.decrypt(
                    raw, private_key=browser.key, auth_secret=browser.auth, version="aes128gcm"
                )
                service.received.append((name, json.loads(plain), claims))
            except Exception as exc:
                service.refused.append(f"{type(exc).__name__}: {exc}")
                self._answer(400, {"error": str(exc)})
                return
            self._answer(201)

        def _token(self, raw: bytes) -> None:
            form = dict(p.split("=", 1) for p in raw.decode().split("&"))
            try:
                assert form["grant_type"] == "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer"
                claims = jwt.decode(
                    form["assertion"],
                    service.service_key.public_key(),
                    algorithms=["RS256"],
                    # google-auth signs for Google's token audience whatever the
                    # token_uri it posts to.
                    audience=[f"{service.base}/token", "https://oauth2.googleapis.com/token"],
                )
                assert "firebase.messaging" in claims["scope"]
            except Exception as exc:
                service.refused.append(f"token: {type(exc).__name__}: {exc}")
                self._answer(400, {"error": "invalid_grant"})
                return
            token = secrets.token_urlsafe(16)
            service.access_tokens.add(token)
            self._answer(200, {"access_token": token, "expires_in": 3600, "token_type": "Bearer"})

        def _fcm(self, raw: bytes) -> None:
            bearer = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if bearer not in service.access_tokens:
                self._answer(401, {"error": {"status": "UNAUTHENTICATED"}})
                return
            message = json.loads(raw)["message"]
            if str(message.get("token", "")).startswith("gone"):
                self._answer(404, {"error": {"status": "NOT_FOUND", "details": [
                    {"errorCode": "UNREGISTERED"}]}})  # fmt: skip
                return
            service.fcm_messages.append({"path": self.path, **message})
            self._answer(
                200, {"name": f"projects/demo-project/messages/{len(service.fcm_messages)}"}
            )

    return Handler


@contextmanager
def push_service() -> Iterator[PushService]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    service = PushService(base=f"http://127.0.0.1:{server.server_address[1]}")
    server.RequestHandlerClass = _handler(service)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield service
    finally:
        server.shutdown()
        server.server_close()
