"""Re-encrypt every credential and signing secret under the newest key.

    SECURITY__ENCRYPTION_KEY=<new> SECURITY__PREVIOUS_ENCRYPTION_KEYS='["<old>"]' \
        python -m backend.credentials.rotate

Afterwards the old key can be dropped from SECURITY__PREVIOUS_ENCRYPTION_KEYS.
"""

from __future__ import annotations

import asyncio

from backend.config import get_settings
from backend.credentials.service import rotate_all
from backend.kit.db import UnitOfWork, create_engine, create_sessionmaker
from backend.triggers.service import rotate_encryption


async def main() -> int:
    settings = get_settings()
    engine = create_engine(settings)
    try:
        # One transaction: either every secret is under the new key, or none moved.
        async with UnitOfWork(create_sessionmaker(engine)) as uow:
            count = await rotate_all(uow.session, settings)
            signing = await rotate_encryption(uow.session, settings)
    finally:
        await engine.dispose()
    print(f"re-encrypted {count} credentials and {signing} signing secrets under the current key")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
