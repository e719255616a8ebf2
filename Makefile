# One target per habit. Every target installs what it needs first, so a fresh machine
# with Python 3.11+ and make goes straight to `make run` or `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# uv from the PATH, or bootstrapped into .uv-bootstrap/ with pip (PyPI only, no curl).
UV := $(shell command -v uv 2>/dev/null || echo .uv-bootstrap/bin/uv)
PYTHON ?= python3
# pytest arguments for `make test`; -n auto spreads the suite over the cores.
PYTEST_ARGS ?= -n auto --dist loadgroup

.PHONY: help install run test faults lint format migrate bench rotate-keys clean

help:
	@echo "make run      start API, worker, beat and Flower (embedded PostgreSQL/Valkey unless DATABASE_URL/REDIS_URL are set)"
	@echo "make test     run the test suite on throwaway servers"
	@echo "make faults   fault injection: worker kills, Redis/PostgreSQL restarts, two beats (~5 min)"
	@echo "make lint     ruff + mypy"
	@echo "make migrate  apply migrations to DATABASE_URL (or the embedded database)"
	@echo "make bench    print the benchmark figures"
	@echo "make rotate-keys  re-encrypt every credential under SECURITY__ENCRYPTION_KEY"

.uv-bootstrap/bin/uv:
	$(PYTHON) -m venv .uv-bootstrap
	.uv-bootstrap/bin/pip install --quiet uv

install: $(if $(findstring .uv-bootstrap,$(UV)),.uv-bootstrap/bin/uv)
	$(UV) sync --frozen

run: install
	$(UV) run --frozen --no-sync python scripts/devstack.py run

test: install
	$(UV) run --frozen --no-sync python scripts/devstack.py test -- $(PYTEST_ARGS)

# Fault injection on a stack of its own (tests/faults); prints the figures. Bounded:
# the suite's own waits end it in minutes, `timeout` is the backstop.
faults: install
	ORCH_FAULTS=1 timeout 900 $(UV) run --frozen --no-sync python scripts/devstack.py test -- tests/faults -n 0 -s -p no:cacheprovider

lint: install
	$(UV) run --frozen --no-sync ruff check .
	$(UV) run --frozen --no-sync ruff format --check .
	$(UV) run --frozen --no-sync mypy

format: install
	$(UV) run --frozen --no-sync ruff check --fix .
	$(UV) run --frozen --no-sync ruff format .

migrate: install
	$(UV) run --frozen --no-sync python scripts/devstack.py exec -- alembic upgrade head

rotate-keys: install
	$(UV) run --frozen --no-sync python scripts/devstack.py exec -- python -m backend.credentials.rotate

bench: install
	$(UV) run --frozen --no-sync python scripts/devstack.py exec --ephemeral -- python -m bench

clean:
	rm -rf .venv .uv-bootstrap .pytest_cache .mypy_cache .ruff_cache
