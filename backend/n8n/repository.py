"""The paging SQL the n8n lists share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession

T = TypeVar("T")


async def paginate(
    session: AsyncSession, stmt: Select[T], *, limit: int, offset: int
) -> tuple[Sequence[T], int]:
    total: Any = await session.scalar(
        select(func.count()).select_from(stmt.order_by(None).subquery())
    )
    items = (await session.scalars(stmt.limit(limit).offset(offset))).all()
    return items, int(total or 0)
