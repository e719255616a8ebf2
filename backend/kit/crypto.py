"""Hashing of tokens and codes, and encryption of secrets at rest.

Tokens we hand out (refresh tokens, API keys, invitation links) are high-entropy, so a
plain SHA-256 is enough to store them. Sign-in codes are six digits, so they are keyed
with the server secret (HMAC): a leaked table alone does not reveal them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from backend.config import Settings


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def keyed_hash(secret: str, *parts: str) -> str:
    return hmac.new(secret.encode(), "\x1f".join(parts).encode(), hashlib.sha256).hexdigest()


def equal(a: str, b: str) -> bool:
    """Constant-time comparison: no timing signal about how much of a guess matched."""
    return hmac.compare_digest(a.encode(), b.encode())


def new_token(prefix: str = "", nbytes: int = 32) -> str:
    return prefix + secrets.token_urlsafe(nbytes)


def new_code(digits: int = 6) -> str:
    return f"{secrets.randbelow(10**digits):0{digits}d}"


def _fernet(key: str) -> Fernet:
    # Any passphrase of 32+ characters becomes a Fernet key; the setting stays human.
    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(key.encode()).digest()))


class SecretBox:
    """Encrypts with the current key; decrypts with the current or any previous one."""

    def __init__(self, settings: Settings) -> None:
        sec = settings.security
        keys = [sec.encryption_key, *sec.previous_encryption_keys]
        self._box = MultiFernet([_fernet(k.get_secret_value()) for k in keys])

    def seal(self, plaintext: str) -> str:
        return self._box.encrypt(plaintext.encode()).decode()

    def rotate(self, token: str) -> str:
        """The same plaintext, encrypted under the current key."""
        try:
            return self._box.rotate(token.encode()).decode()
        except InvalidToken as exc:
            raise ValueError("cannot decrypt: wrong key or tampered data") from exc

    def open(self, token: str) -> str:
        try:
            return self._box.decrypt(token.encode()).decode()
        except InvalidToken as exc:
            raise ValueError("cannot decrypt: wrong key or tampered data") from exc
