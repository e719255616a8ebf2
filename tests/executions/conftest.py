"""The real uvicorn of the end-to-end tests, for every module here."""

from tests.support.crossprocess import api, owner  # noqa: F401  (fixtures)
