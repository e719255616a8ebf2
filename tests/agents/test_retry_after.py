"""The provider's Retry-After becomes a sane whole number of seconds whatever it says."""

from __future__ import annotations

import pytest

from backend.agents.service import _retry_after_s


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("7", 7), ("2.5", 2), ("0", 1), ("1.2.3", 30), ("²", 30), ("inf", 30), ("nan", 30),
     ("1e9", 3600), ("Wed, 21 Oct 2026 07:28:00 GMT", 30), (None, 30), ("", 30)],
)  # fmt: skip
def test_retry_after_is_parsed_without_raising(header: str | None, seconds: int) -> None:
    assert _retry_after_s(header) == seconds
