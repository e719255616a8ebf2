"""Log-scale latency histograms that can be added across hours: percentiles of a month
are read from the sum of its hours, without keeping every duration.

Slot 0 holds durations under 1 ms; slot i >= 1 holds [GROWTH**(i-1), GROWTH**i) ms; the
last slot holds everything longer. A percentile is the geometric middle of its slot, so
it is within +-12 % of the true value (GROWTH = 1.25)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

GROWTH = 1.25
SLOTS = 80  # 1.25**79 ms ~ 12 h: longer runs all land in the last slot
_LOG_GROWTH = math.log(GROWTH)

Histogram = dict[str, int]


def slot(ms: float) -> int:
    if not ms >= 1.0:  # also NaN
        return 0
    return min(SLOTS - 1, 1 + int(math.log(ms) / _LOG_GROWTH))


def add(hist: Histogram, ms: float) -> None:
    key = str(slot(ms))
    hist[key] = hist.get(key, 0) + 1


def merge(into: Histogram, other: Mapping[str, int]) -> Histogram:
    for key, count in other.items():
        into[key] = into.get(key, 0) + int(count)
    return into


def merged(hists: Iterable[Mapping[str, int]]) -> Histogram:
    out: Histogram = {}
    for h in hists:
        merge(out, h)
    return out


def _middle(index: int) -> float:
    if index == 0:
        return 0.5
    low, high = GROWTH ** (index - 1), GROWTH**index
    return math.sqrt(low * high)


_MIDDLES = [round(_middle(i), 3) for i in range(SLOTS)]


def middle(index: int | None) -> float | None:
    """A slot's value as a percentile reports it (None for no slot)."""
    return None if index is None else _MIDDLES[min(max(int(index), 0), SLOTS - 1)]


def _rank(q: float, total: int) -> int:
    # ceil(q * total) in integers (q in hundredths), exactly as PostgreSQL's numeric
    # ceil(0.95 * total) reads it: a float product like 56.99999... must not differ.
    return max(1, (round(q * 100) * int(total) + 99) // 100)


def percentile(hist: Mapping[str, int], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) in ms, or None for an empty histogram."""
    total = sum(hist.values())
    if total <= 0:
        return None
    rank = _rank(q, total)
    seen = 0
    for index in sorted(int(k) for k in hist):
        seen += hist[str(index)]
        if seen >= rank:
            return round(_middle(index), 3)
    return round(_middle(max(int(k) for k in hist)), 3)  # pragma: no cover - rank <= total


_QS = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))


def quantiles(hist: Mapping[str, int]) -> dict[str, float | None]:
    """p50, p95 and p99 in one pass over the sorted slots (what `percentile` gives)."""
    total = sum(hist.values())
    if total <= 0:
        return {name: None for name, _ in _QS}
    out: dict[str, float | None] = {}
    wanted = [(name, _rank(q, total)) for name, q in _QS]
    seen = 0
    for key in sorted(hist, key=int):
        seen += int(hist[key])
        while wanted and seen >= wanted[0][1]:
            out[wanted.pop(0)[0]] = _MIDDLES[min(int(key), SLOTS - 1)]
    return out
