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

import importlib
from typing import Any


class _LazyModule:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        # sys.modules answers every call after the first: a dict lookup, not an import.
        return getattr(importlib.import_module(self._name), attribute)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy_module(name: str) -> Any:
    return _LazyModule(name)
