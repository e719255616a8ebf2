"""A small generic repository: the SQL a domain needs for one model, in one place."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.kit.errors import NotFound
from backend.models.base import Base

M = TypeVar("M", bound=Base)


class Repository(Generic[M]):
    model: type[M]

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def select(self) -> Select[M]:
        return select(self.model)

    async def get(self, id_: uuid.UUID) -> M | None:
        return await self.session.get(self.model, id_)

    async def get_or_404(self, id_: uuid.UUID) -> M:
        obj = await self.get(id_)
        if obj is None:
            raise NotFound(f"{self.model.__name__} not found")
        return obj

    async def one_or_none(self, stmt: Select[M]) -> M | None:
        return (await self.session.execute(stmt)).scalar_one_or_none()

    async def paginate(
        self, stmt: Select[M], *, limit: int, offset: int
    ) -> tuple[Sequence[M], int]:
        total = await self.session.scalar(
            select(func.count()).select_from(stmt.order_by(None).subquery())
        )
        items = (await self.session.execute(stmt.limit(limit).offset(offset))).scalars().all()
        return items, int(total or 0)

    async def add(self, obj: M) -> M:
        self.session.add(obj)
        await self.session.flush()
        return obj

    async def update(self, obj: M, values: dict[str, Any]) -> M:
        for key, value in values.items():
            setattr(obj, key, value)
        await self.session.flush()
        return obj

    async def delete(self, obj: M) -> None:
        await self.session.delete(obj)
        await self.session.flush()
