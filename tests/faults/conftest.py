"""The fault-injection suite runs only under `make faults` (ORCH_FAULTS=1): it takes
minutes and starts servers of its own, so `make test` leaves it out."""

from __future__ import annotations

import os

if os.environ.get("ORCH_FAULTS") != "1":
    collect_ignore_glob = ["test_*.py"]
