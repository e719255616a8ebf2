"""List pages: every list endpoint answers {items, total, limit, offset}, limit capped."""

from __future__ import annotations

from typing import Annotated, Generic, TypeVar

from fastapi import Depends, Query
from pydantic import BaseModel

T = TypeVar("T")

MAX_LIMIT = 100
DEFAULT_LIMIT = 20
# The largest PostgreSQL `integer`. Numbers from outside that the database compares or
# skips by (offsets, version numbers) stay within it, or a query fails instead of
# answering 422.
MAX_DB_INT = 2**31 - 1


class PageParams(BaseModel):
    limit: int
    offset: int


# async: a plain `def` dependency would run in a worker thread (a hop per request).
async def _page_params(
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    offset: Annotated[int, Query(ge=0, le=MAX_DB_INT)] = 0,
) -> PageParams:
    return PageParams(limit=limit, offset=offset)


PageParamsDep = Annotated[PageParams, Depends(_page_params)]


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int
