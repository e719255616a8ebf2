"""A node's retry waits are finite and bounded: NaN, infinity and absurd waits are a
validation error when the workflow is saved, not a checkpoint PostgreSQL refuses later."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from backend.workflows.graph import RetryPolicy


@pytest.mark.parametrize("wait", ["NaN", "Infinity", "-Infinity", 1e308, -1, 86_401])
def test_a_retry_wait_that_is_not_a_sane_number_of_seconds_is_refused(wait: object) -> None:
    with pytest.raises(ValidationError):
        RetryPolicy.model_validate({"backoff_s": [1, wait]})


def test_ordinary_waits_are_kept() -> None:
    assert RetryPolicy.model_validate({"backoff_s": [0, 2.5, 86_400]}).backoff_s == [0, 2.5, 86_400]
