"""Trigger helpers several test packages use: a workflow whose trigger node is
configured as given, published and synced the way a save syncs it; a committed owner
for tests that go through a worker; and a local webhook receiver."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.permissions import Role
from backend.config import Settings
from backend.models import Workflow, Workspace
from backend.triggers import service as triggers
from tests.support.factories import make_workflow
from tests.support.identity import add_member, make_user, sign_in


def with_trigger(config: dict[str, Any], node_id: str = "start") -> dict[str, Any]:
    return {
        "nodes": [
            {"id": node_id, "type": "trigger", "config": config},
            {
                "id": "shape",
                "type": "logic",
                "config": {"kind": "transform", "template": "{{ trigger }}"},
            },
        ],
        "connections": [{"source": node_id, "target": "shape"}],
        "settings": {},
    }


async def published(
    session: AsyncSession,
    workspace: Workspace,
    definition: dict[str, Any],
    *,
    now: datetime | None = None,
) -> Workflow:
    workflow = await make_workflow(session, workspace, definition=definition, status="published")
    await triggers.sync(session, workflow, definition, now=now)
    return workflow


async def committed_owner(
    maker: async_sessionmaker[AsyncSession], settings: Settings, workspace: Workspace
) -> dict[str, str]:
    """Headers of a committed owner of `workspace` (for tests that go through a worker)."""
    async with maker() as session:
        user = await make_user(session)
        await add_member(session, workspace, user, Role.OWNER)
        actor = await sign_in(session, settings, user)
        await session.commit()
    return {**actor.headers, "X-Workspace-ID": str(workspace.id)}


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A local HTTP endpoint on 127.0.0.1 that keeps every POST it gets."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                receiver.requests.append(
                    Received(
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                        self.rfile.read(length),
                    )
                )
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def wait_for(self, count: int = 1, timeout_s: float = 30) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(self.requests) >= count:
                return self.requests
            time.sleep(0.05)
        raise AssertionError(f"receiver got {len(self.requests)} requests, wanted {count}")
