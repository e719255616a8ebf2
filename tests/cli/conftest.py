"""The real uvicorn (next to the session's real worker) the CLI talks to."""

from tests.support.crossprocess import api, owner  # noqa: F401  (fixtures)
