"""Start Flower with its port and basic auth taken from our settings.

Flower reads FLOWER_* variables; passing the password that way keeps it out of the
process list, where a `--basic-auth=` argument would show it to every local user.
"""

from __future__ import annotations

import os
import sys

from backend.config import get_settings


def main() -> None:
    settings = get_settings()
    flower = settings.flower
    env = dict(os.environ)
    env["FLOWER_BASIC_AUTH"] = f"{flower.user}:{flower.password.get_secret_value()}"
    env["FLOWER_PORT"] = str(flower.port)
    env["FLOWER_ADDRESS"] = flower.address
    # Keeps Flower's memory bounded on a busy fleet.
    env.setdefault("FLOWER_MAX_TASKS", "10000")
    # Flower stores nothing by itself; the run history lives in PostgreSQL.
    args = [sys.executable, "-m", "celery", "-A", "workers", "flower", *sys.argv[1:]]
    os.execve(sys.executable, args, env)  # noqa: S606 - exec, no shell, on purpose


if __name__ == "__main__":
    main()
