"""A real uvicorn and the session's real worker, shared by the stream tests."""

from tests.executions.test_end_to_end import api, owner  # noqa: F401  (fixtures)
