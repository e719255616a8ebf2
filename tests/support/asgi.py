"""An in-process HTTP client for an app, with its lifespan run."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker


def random_ip() -> str:
    return f"10.{random.randrange(256)}.{random.randrange(256)}.{random.randrange(1, 255)}"


async def client_for(
    app: FastAPI,
    sessionmaker: async_sessionmaker[AsyncSession] | None = None,
    *,
    client_ip: str | None = None,
) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and yield a client; with a sessionmaker, requests use it
    (the tests' rolled-back transaction) instead of the app's own engine. Each client
    comes from its own address, so per-IP rate limits of one test never touch another."""
    async with app.router.lifespan_context(app):
        if sessionmaker is not None:
            app.state.sessionmaker = sessionmaker
        transport = httpx.ASGITransport(app=app, client=(client_ip or random_ip(), 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client
