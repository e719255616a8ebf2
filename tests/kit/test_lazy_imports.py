"""Start-up cost: the API and the worker do not import the heavy SDKs until they call them.

Every process a deployment (and this test suite) starts paid ~5 s of CPU for anthropic,
mcp and trafilatura before they were imported on first use (backend/kit/lazy.py).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from backend.kit.lazy import lazy_module

HEAVY = ("anthropic", "mcp", "trafilatura", "aiohttp")


def test_entry_points_leave_heavy_sdks_unimported() -> None:
    # Both entry points in one process: each import costs seconds of CPU.
    probe = (
        "import sys, backend.main, workers\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", f"imported at start-up: {done.stdout.strip()}"


def test_lazy_module_imports_on_first_attribute() -> None:
    colorsys = lazy_module("colorsys")
    # An attribute of the real module, through the stand-in; a missing one raises as usual.
    assert colorsys.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)
    with pytest.raises(AttributeError):
        _ = colorsys.no_such_function
    assert "colorsys" in repr(colorsys)
