"""The real uvicorn of the end-to-end tests, for every module here."""

from tests.executions.test_end_to_end import api, owner  # noqa: F401  (fixtures)
