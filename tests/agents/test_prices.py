"""The dated price table: the longest prefix in force on the day wins; unknown models
cost nothing rather than something wrong; operators replace the table from the env."""

from __future__ import annotations

from datetime import date
from types import SimpleNamespace

import pytest

from backend.agents.runtime import price_of
from backend.config import DEFAULT_PRICES, ModelPrice, Settings

USAGE = SimpleNamespace(
    input_tokens=1_000_000,
    output_tokens=1_000_000,
    cache_creation_input_tokens=1_000_000,
    cache_read_input_tokens=1_000_000,
)


def test_longest_prefix_in_force_on_the_day_wins() -> None:
    # Opus 4.1 keeps its own (older, higher) price; later Opus models the newer one.
    assert price_of(DEFAULT_PRICES, "claude-opus-4-1-20250805", USAGE) == pytest.approx(
        15 + 75 + 15 * 1.25 + 15 * 0.1
    )
    assert price_of(DEFAULT_PRICES, "claude-opus-4-5", USAGE) == pytest.approx(
        5 + 25 + 5 * 1.25 + 5 * 0.1
    )
    # Before the newer Opus price existed, no row for the model was in force.
    assert price_of(DEFAULT_PRICES, "claude-opus-4-5", USAGE, on=date(2025, 1, 1)) is None
    assert price_of(DEFAULT_PRICES, "gpt-4o", USAGE) is None


def test_a_price_change_is_a_new_dated_row() -> None:
    old = ModelPrice(
        model="claude-sonnet", since=date(2024, 1, 1), input_per_mtok=3, output_per_mtok=15
    )
    new = ModelPrice(
        model="claude-sonnet",
        since=date(2026, 12, 1),
        input_per_mtok=2,
        output_per_mtok=10,
        cache_read_per_mtok=0,
    )
    prices = [old, new]
    usage = SimpleNamespace(input_tokens=500_000, output_tokens=100_000, cache_read_input_tokens=10)
    assert price_of(prices, "claude-sonnet-5-5", usage, on=date(2026, 11, 30)) == pytest.approx(
        1.5 + 1.5 + 10 * 0.3 / 1_000_000
    )
    assert price_of(prices, "claude-sonnet-5-5", usage, on=date(2026, 12, 1)) == pytest.approx(
        1.0 + 1.0
    )


def test_operators_replace_the_table_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "ANTHROPIC__PRICES",
        '[{"model": "claude-", "since": "2026-01-01", "input_per_mtok": 1, "output_per_mtok": 2}]',
    )
    prices = Settings().anthropic.prices
    assert [(p.model, p.since, p.cache_write) for p in prices] == [
        ("claude-", date(2026, 1, 1), 1.25)
    ]
