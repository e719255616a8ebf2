"""The unit of work: commit on success, roll back on error, side effects only after commit."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.kit.db import UnitOfWork
from backend.kit.errors import NotFound
from backend.kit.repository import Repository
from backend.models import Workspace


class WorkspaceRepository(Repository[Workspace]):
    model = Workspace


async def count(session: AsyncSession, slug: str) -> int:
    return int(await session.scalar(select(func.count()).where(Workspace.slug == slug)) or 0)


async def test_commits_and_then_runs_after_commit_callbacks(
    sessionmaker: async_sessionmaker[AsyncSession], session: AsyncSession
) -> None:
    seen: list[int] = []
    async with UnitOfWork(sessionmaker) as uow:
        uow.session.add(Workspace(name="A", slug="uow-a"))
        uow.after_commit(lambda: seen.append(1))

        async def later() -> None:
            seen.append(2)

        uow.after_commit(later)
        assert seen == []  # nothing runs before the commit
    assert seen == [1, 2]
    assert await count(session, "uow-a") == 1


async def test_rolls_back_and_drops_side_effects_on_error(
    sessionmaker: async_sessionmaker[AsyncSession], session: AsyncSession
) -> None:
    seen: list[str] = []
    with pytest.raises(RuntimeError):
        async with UnitOfWork(sessionmaker) as uow:
            uow.session.add(Workspace(name="B", slug="uow-b"))
            await uow.session.flush()
            uow.after_commit(lambda: seen.append("enqueued"))
            raise RuntimeError("boom")
    assert seen == []
    assert await count(session, "uow-b") == 0


async def test_a_failing_side_effect_does_not_undo_the_commit(
    sessionmaker: async_sessionmaker[AsyncSession], session: AsyncSession
) -> None:
    seen: list[str] = []

    def broken() -> None:
        raise ConnectionError("broker down")

    async with UnitOfWork(sessionmaker) as uow:
        uow.session.add(Workspace(name="C", slug="uow-c"))
        uow.after_commit(broken)
        uow.after_commit(lambda: seen.append("next one still runs"))
    assert seen == ["next one still runs"]
    assert await count(session, "uow-c") == 1


async def test_repository_paginates_and_counts(session: AsyncSession) -> None:
    repo = WorkspaceRepository(session)
    for i in range(5):
        await repo.add(Workspace(name=f"P{i}", slug=f"page-{i}"))
    stmt = repo.select().where(Workspace.slug.like("page-%")).order_by(Workspace.slug)
    items, total = await repo.paginate(stmt, limit=2, offset=2)
    assert total == 5
    assert [w.slug for w in items] == ["page-2", "page-3"]


async def test_records_get_uuid_keys_and_aware_timestamps(session: AsyncSession) -> None:
    ws = await WorkspaceRepository(session).add(Workspace(name="T", slug="times"))
    await session.refresh(ws)
    assert ws.id.version == 4
    assert ws.created_at.tzinfo is not None
    assert ws.settings == {}


async def test_get_or_404_raises_not_found(session: AsyncSession) -> None:
    import uuid

    with pytest.raises(NotFound):
        await WorkspaceRepository(session).get_or_404(uuid.uuid4())
