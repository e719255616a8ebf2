"""The real uvicorn (next to the session's real worker) the console is served by."""

from tests.support.crossprocess import api, owner  # noqa: F401  (fixtures)
