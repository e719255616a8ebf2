"""Re-encrypt every secret kept at rest under the newest key: credentials, webhook and
notification signing secrets, and MCP servers' headers and env values.

    SECURITY__ENCRYPTION_KEY=<new> SECURITY__PREVIOUS_ENCRYPTION_KEYS='["<old>"]' \
        python -m backend.credentials.rotate

Afterwards the old key can be dropped from SECURITY__PREVIOUS_ENCRYPTION_KEYS.
"""

from __future__ import annotations

import asyncio
import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.config import Settings, get_settings
from backend.credentials.service import rotate_all
from backend.kit.crypto import SecretBox
from backend.kit.db import UnitOfWork, create_engine, create_sessionmaker
from backend.models import McpServer
from backend.triggers.service import rotate_encryption


async def rotate_mcp_servers(session: AsyncSession, settings: Settings, *, batch: int = 500) -> int:
    """Re-encrypt MCP servers' sealed headers/env. The plaintext (with the row binding
    sealed inside it) is unchanged, so what opened before opens after. Safe to run
    again."""
    box = SecretBox(settings)
    done = 0
    last: uuid.UUID | None = None
    while True:
        stmt = (
            select(McpServer)
            .where(McpServer.secrets_encrypted.is_not(None))
            .order_by(McpServer.id)
            .limit(batch)
            .with_for_update()
        )
        if last is not None:
            stmt = stmt.where(McpServer.id > last)
        rows = (await session.scalars(stmt)).all()
        if not rows:
            return done
        for server in rows:
            assert server.secrets_encrypted is not None
            server.secrets_encrypted = box.rotate(server.secrets_encrypted)
            done += 1
        last = rows[-1].id
        await session.flush()


async def rotate_everything(session: AsyncSession, settings: Settings) -> dict[str, int]:
    """Every kind of sealed secret, in the caller's transaction; counts by kind."""
    return {
        "credentials": await rotate_all(session, settings),
        "signing secrets": await rotate_encryption(session, settings),
        "MCP servers": await rotate_mcp_servers(session, settings),
    }


async def main() -> int:
    settings = get_settings()
    engine = create_engine(settings)
    try:
        # One transaction: either every secret is under the new key, or none moved.
        async with UnitOfWork(create_sessionmaker(engine)) as uow:
            counts = await rotate_everything(uow.session, settings)
    finally:
        await engine.dispose()
    done = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    print(f"re-encrypted under the current key: {done}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
