"""`python -m studio` is the same as the `studio` command."""

from studio.main import run

run()
