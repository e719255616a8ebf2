"""A real SMTP server on 127.0.0.1 (aiosmtpd) that keeps what it receives."""

from __future__ import annotations

import re
import time
from email import message_from_bytes
from email.message import Message
from typing import Any

from aiosmtpd.controller import Controller


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's hook name
        self.messages.append(message_from_bytes(envelope.original_content or envelope.content))
        return "250 OK"

    def wait_for(self, to: str, *, after: int = 0, timeout_s: float = 30) -> Message:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for msg in self.messages[after:]:
                if msg["To"] == to:
                    return msg
            time.sleep(0.05)
        raise AssertionError(f"no mail to {to} within {timeout_s} s")

    def count(self) -> int:
        return len(self.messages)


def body_of(msg: Message) -> str:
    payload = msg.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode()


def code_in(msg: Message) -> str:
    found = re.search(r"\b(\d{6})\b", body_of(msg))
    assert found, body_of(msg)
    return found.group(1)


def start_smtp(port: int) -> tuple[Controller, Mailbox]:
    mailbox = Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    return controller, mailbox
