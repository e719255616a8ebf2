"""An in-process HTTP client for an app, with its lifespan run."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker


async def client_for(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and yield a client; with a sessionmaker, requests use it
    (the tests' rolled-back transaction) instead of the app's own engine."""
    async with app.router.lifespan_context(app):
        if sessionmaker is not None:
            app.state.sessionmaker = sessionmaker
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client
