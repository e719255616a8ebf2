"""Modules imported on first use.

Some SDKs cost seconds of CPU to import (anthropic loads its Vertex, Bedrock and every
beta type; trafilatura its language data), and every API process, worker and test
process paid that at start-up whether or not it ever called them. `lazy_module` gives a
stand-in whose first attribute access imports the real module through the normal import
system (so the import lock keeps it thread-safe, unlike importlib's LazyLoader on 3.11).

Use it with a TYPE_CHECKING import so type checkers still see the real module:

    if TYPE_CHECKING:
        import anthropic
    else:
        anthropic = lazy_module("anthropic")
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from typing import Any


class _LazyModule:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__"):
            # copy, pickle and friends probe dunders: they are not the module's names.
            raise AttributeError(attribute)
        # sys.modules answers every call after the first: a dict lookup, not an import.
        name = object.__getattribute__(self, "_name")
        return getattr(importlib.import_module(name), attribute)

    def __setattr__(self, attribute: str, value: Any) -> None:
        setattr(importlib.import_module(object.__getattribute__(self, "_name")), attribute, value)

    def __repr__(self) -> str:
        return f"<lazy module {object.__getattribute__(self, '_name')!r}>"


async def preload(name: str) -> None:
    """Import `name` in a thread unless it is imported already: a first import costs
    seconds of CPU, which must not stall an event loop that carries other runs, their
    lease renewals and live events. Call it before the first use on a loop."""
    if name not in sys.modules:
        await asyncio.to_thread(importlib.import_module, name)


def lazy_module(name: str) -> Any:
    return _LazyModule(name)
