# One target per habit. Every target installs what it needs first, so a fresh machine
# with Python 3.11+ and make goes straight to `make run` or `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# uv from the PATH, or bootstrapped into .uv-bootstrap/ with pip (PyPI only, no curl).
UV := $(shell command -v uv 2>/dev/null || echo .uv-bootstrap/bin/uv)
PYTHON ?= python3
# pytest arguments for `make test`; -n auto spreads the suite over the cores.
PYTEST_ARGS ?= -n auto --dist loadgroup

.PHONY: help install run test test-n8n faults lint format migrate bench rotate-keys api-key browser test-browser clean

help:
	@echo "make run      start API, worker, beat and Flower (embedded PostgreSQL/Valkey unless DATABASE_URL/REDIS_URL are set)"
	@echo "make test     run the test suite on throwaway servers"
	@echo "make test-n8n  the n8n client and sync against a real n8n 2.41.1 (installs it once into ~/.cache: ~3 GB, ~8 min)"
	@echo "make faults   fault injection: worker kills, Redis/PostgreSQL restarts, two beats (~5 min)"
	@echo "make lint     ruff + mypy"
	@echo "make migrate  apply migrations to DATABASE_URL (or the embedded database)"
	@echo "make bench    print the benchmark figures"
	@echo "make rotate-keys  re-encrypt every credential under SECURITY__ENCRYPTION_KEY"
	@echo "make api-key  print a new API key (creates the first user and workspace if there are none)"
	@echo "make test-browser  the console's tests in headless Chromium (installs Debian's chromium)"

.uv-bootstrap/bin/uv:
	$(PYTHON) -m venv .uv-bootstrap
	.uv-bootstrap/bin/pip install --quiet uv

install: $(if $(findstring .uv-bootstrap,$(UV)),.uv-bootstrap/bin/uv)
	$(UV) sync --frozen

run: install
	$(UV) run --frozen --no-sync python scripts/devstack.py run

test: install browser
	$(UV) run --frozen --no-sync python scripts/devstack.py test -- $(PYTEST_ARGS)

# The n8n fleet tests against a real n8n (tests/n8n/real): installed from the npm
# registry into a cache outside the repo once (N8N_CACHE, default ~/.cache/...),
# started on loopback with a fresh database per run.
test-n8n: install
	ORCH_REAL_N8N=1 UV=$(UV) timeout 1800 $(UV) run --frozen --no-sync python scripts/devstack.py test -- tests/n8n/real -n 0 -s -p no:cacheprovider

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
	@# The API part's load generator (Debian's wrk): installed when missing and possible.
	@command -v wrk >/dev/null || apt-get install -y -qq wrk >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq wrk >/dev/null 2>&1) || echo "wrk not installed: BENCH_PARTS without api, or install wrk"
	$(UV) run --frozen --no-sync python scripts/devstack.py exec --ephemeral -- python -m bench

# A new API key for scripts and CI, straight from the database (the running `make run`
# stack's, or DATABASE_URL's): no mailbox needed. Arguments go through, e.g.
# make api-key ARGS="--role viewer --workspace <id>". Migrates first (a no-op when
# current): on a fresh machine there is no schema yet. The key alone goes to stdout.
api-key: install
	@$(UV) run --frozen --no-sync python scripts/devstack.py exec -- \
	  sh -c 'alembic upgrade head >&2 && exec studio admin create-api-key "$$@"' studio $(ARGS)

# The console's browser tests drive Debian's Chromium through Playwright (Playwright's
# own browser download cannot work here). Installed with apt-get when missing (needs
# root, as on CI; elsewhere it says what to run and the browser tests fail naming it);
# CHROMIUM names another binary. `make test` runs them too, so it installs it first.
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x "$(CHROMIUM)" || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium (for the console's browser tests)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "note: no $(CHROMIUM); the console's browser tests need it: sudo apt-get install chromium"; \
	  fi; }

test-browser: install browser
	CHROMIUM=$(CHROMIUM) $(UV) run --frozen --no-sync python scripts/devstack.py test -- tests/console -n 0 -p no:cacheprovider

clean:
	rm -rf .venv .uv-bootstrap .pytest_cache .mypy_cache .ruff_cache
