"""Fixtures of the analytics tests: a signed-in viewer of a workspace holding a
seeded month of runs."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.permissions import Role
from backend.config import Settings
from backend.models import Workspace
from tests.analytics.seed import Seeded, seed_month
from tests.support.identity import Actor, member


@pytest.fixture
async def month(session: AsyncSession, team: Workspace) -> Seeded:
    return await seed_month(session, team, datetime.now(UTC))


@pytest.fixture
async def viewer(session: AsyncSession, settings: Settings, team: Workspace) -> Actor:
    actor = await member(session, settings, team, Role.VIEWER)
    actor.headers["X-Workspace-ID"] = str(team.id)
    return actor
