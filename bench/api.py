"""The API's own speed (issue 20): wrk against a bare FastAPI app and the product, in
the same run, on the same uvicorn flags.

    BENCH_PARTS=api make bench

Rows: the bare app's `/health` (the framework floor), the product's `/health`
(middleware only), and, with a bearer token, `GET /api/v1/workflows?limit=20`,
`GET /api/v1/workflows/{id}` and `POST /api/v1/executions`. Each prints req/s,
p50/p95/p99, errors (connect/read/write/timeout and non-2xx answers), the ratio of its
req/s to the bare app's, and the server's CPU time per answered request (user + system,
summed over its processes): on a machine other work shares, req/s says how much CPU the
server got, CPU per request what a request costs. wrk is a C load generator: on 2 cores
it takes a fraction of one, so it is not the bottleneck (the issue's own figures were
taken with it).

BENCH_API_SECONDS (default 10) and BENCH_API_CONNECTIONS (default 32) set the load;
BENCH_API_WORKERS (default 2; 0 or 1 to skip) the number of processes of the second
table (uvicorn --workers, as the Procfile runs it on a machine with that many cores).
BENCH_API_BASELINE=<dir of another checkout> adds the same rows for that code (its
`backend` package, on this database) to the first table: before/after in one run.
BENCH_API_PROFILE=<prefix> records the server with py-spy (on the PATH) during each
authenticated row, as raw stacks in <prefix>.<row>.<process>.txt.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import httpx
import psutil
from fastapi import FastAPI

# The floor: the same framework and server, no middleware, no I/O.
bare_app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@bare_app.get("/health")
async def bare_health() -> dict[str, str]:
    return {"status": "ok"}


SECONDS = int(os.environ.get("BENCH_API_SECONDS", "10"))
CONNECTIONS = int(os.environ.get("BENCH_API_CONNECTIONS", "32"))

# wrk's Lua hooks: the request (method, headers, body from the environment) and, at
# the end, one JSON line with the figures wrk's own summary lacks (p95, error kinds).
LUA = r"""
wrk.method = os.getenv("BENCH_METHOD") or "GET"
local body = os.getenv("BENCH_BODY")
if body and #body > 0 then wrk.body = body end
local headers = os.getenv("BENCH_HEADERS")
if headers and #headers > 0 then
  for line in string.gmatch(headers, "[^\n]+") do
    local name, value = string.match(line, "^([^:]+):%s*(.*)$")
    wrk.headers[name] = value
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nBENCH {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50":%d,"p95":%d,"p99":%d,"max":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
"""


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: str = "",
    seconds: int = SECONDS,
    connections: int = CONNECTIONS,
) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA)
    try:
        env = dict(
            os.environ,
            BENCH_METHOD=method,
            BENCH_BODY=body,
            BENCH_HEADERS="\n".join(f"{k}: {v}" for k, v in (headers or {}).items()),
        )
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", script.name, url],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        ).stdout
    finally:
        os.unlink(script.name)
    line = next(x for x in out.splitlines() if x.startswith("BENCH "))
    figures: dict[str, Any] = json.loads(line.removeprefix("BENCH "))
    figures["rps"] = figures["requests"] / (figures["duration_us"] / 1e6)
    figures["errors"] = sum(figures[k] for k in ("connect", "read", "write", "status", "timeout"))
    return figures


def server_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by a server and its children (uvicorn
    --workers runs the app in child processes)."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in (root, *root.children(recursive=True)):
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def run_wrk_cpu(pid: int, url: str, profile: str = "", **kwargs: Any) -> dict[str, Any]:
    """run_wrk, plus the server's CPU milliseconds per answered request: on a shared,
    loaded machine req/s says how much CPU the server got, CPU per request what a
    request costs."""
    recorders = _profile(pid, profile)
    before = server_cpu_s(pid)
    figures = run_wrk(url, **kwargs)
    figures["cpu_ms"] = (server_cpu_s(pid) - before) * 1000 / max(1, figures["requests"])
    for recorder in recorders:
        recorder.wait()
    return figures


def _profile(pid: int, name: str) -> list[subprocess.Popen[bytes]]:
    """BENCH_API_PROFILE=<prefix>: py-spy (on the PATH) records each serving process
    while wrk runs a row, as raw stacks in <prefix>.<row>.<process>.txt (for
    flamegraph.pl or a grep). The recording adds its own sampling overhead to the row's
    CPU per request."""
    prefix = os.environ.get("BENCH_API_PROFILE")
    if not prefix or not name:
        return []
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise RuntimeError("BENCH_API_PROFILE needs py-spy on the PATH")
    root = psutil.Process(pid)
    # The worker processes (uvicorn --workers only supervises them), or the one process.
    pids = [p.pid for p in root.children()] or [pid]
    return [
        subprocess.Popen(
            [
                *(py_spy, "record", "-r", "200", "-f", "raw", "-d", str(SECONDS)),
                *("-p", str(each), "-o", f"{prefix}.{name}.{i}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i, each in enumerate(pids)
    ]


def print_table(title: str, rows: list[tuple[str, dict[str, Any]]], floor_rps: float) -> None:
    print()
    print(
        f"{title:<52} {'req/s':>8} {'p50':>9} {'p95':>9} {'p99':>9} {'errors':>6} {'x bare':>7}"
        f" {'CPU/req':>9}"
    )
    for name, f in rows:
        print(
            f"{name:<52} {f['rps']:>8.0f} {f['p50'] / 1000:>6.1f} ms {f['p95'] / 1000:>6.1f} ms"
            f" {f['p99'] / 1000:>6.1f} ms {f['errors']:>6} {f['rps'] / floor_rps:>6.2f}x"
            f" {f['cpu_ms']:>6.2f} ms",
            flush=True,
        )


def _seed(base: str, headers: dict[str, str]) -> tuple[str, str]:
    """A workflow to read and run: (its id, the body of POST /executions)."""
    definition = {
        "name": "bench api",
        "nodes": [
            {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
            {"id": "t", "type": "logic", "config": {"kind": "transform", "template": "{{ 1 }}"}},
        ],
        "connections": [{"source": "start", "target": "t"}],
    }
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        created = client.post("/api/v1/workflows", json=definition)
        created.raise_for_status()
        workflow_id = str(created.json()["id"])
        # A list of 20 to page through, as a front end's first screen would.
        for i in range(19):
            client.post("/api/v1/workflows", json={**definition, "name": f"bench {i}"})
    body = json.dumps({"workflow_id": workflow_id, "trigger_type": "manual", "trigger_data": {}})
    return workflow_id, body


def measure(
    process: Callable[..., AbstractContextManager[Any]],
    env: dict[str, str],
    headers: dict[str, str],
    free_port: Callable[[], int],
    uvicorn_argv: Callable[[int], list[str]],
) -> None:
    """Print the API tables. `process`, `free_port` and `uvicorn_argv` come from
    bench/__main__.py so every part starts servers the same way."""
    if not wrk_available():
        raise RuntimeError(
            "the api part needs wrk (Debian package `wrk`; `make bench` installs it)"
        )
    # One bench user sends tens of thousands of requests: lift its per-user budget (the
    # limiter still runs on every request, as in production).
    api_env = dict(env, AUTH__API_RATE_LIMIT="100000000 per hour")

    def served(
        app: str, port: int, workers: int = 1, app_dir: str | None = None
    ) -> AbstractContextManager[Any]:
        argv = [*uvicorn_argv(port), "--workers", str(workers)]
        argv[argv.index("backend.main:app")] = app
        if app_dir:
            argv += ["--app-dir", app_dir]
        base = f"http://127.0.0.1:{port}"
        return process(argv, api_env, lambda: httpx.get(f"{base}/health").status_code == 200)

    print(
        f"\nAPI speed: wrk -t1 -c{CONNECTIONS} -d{SECONDS}s, same uvicorn flags;"
        f" x bare: req/s over the bare app's in the same table",
        flush=True,
    )
    port = free_port()
    with served("bench.api:bare_app", port) as proc:
        bare = run_wrk_cpu(proc.pid, f"http://127.0.0.1:{port}/health")
    rows = [("bare FastAPI app, GET /health", bare)]
    if baseline := os.environ.get("BENCH_API_BASELINE"):
        rows.extend(_product(served, free_port, headers, 1, baseline, " [baseline]"))
    rows.extend(_product(served, free_port, headers, 1))
    print_table("one process", rows, bare["rps"])
    workers = int(os.environ.get("BENCH_API_WORKERS", "2"))
    if workers > 1:
        port = free_port()
        with served("bench.api:bare_app", port, workers) as proc:
            bare_n = run_wrk_cpu(proc.pid, f"http://127.0.0.1:{port}/health")
        rows = [(f"bare FastAPI app, GET /health ({workers} processes)", bare_n)]
        rows.extend(_product(served, free_port, headers, workers))
        print_table(f"{workers} processes (--workers)", rows, bare_n["rps"])


def _product(
    served: Callable[..., AbstractContextManager[Any]],
    free_port: Callable[[], int],
    headers: dict[str, str],
    workers: int,
    app_dir: str | None = None,
    label: str = "",
) -> list[tuple[str, dict[str, Any]]]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    suffix = (f" ({workers} processes)" if workers > 1 else "") + label
    tag = f"{workers}p" + ("-baseline" if label else "")
    with served("backend.main:app", port, workers, app_dir) as proc:
        workflow_id, body = _seed(base, headers)
        # A short warm-up: first connections, lazy imports, statement caches.
        run_wrk(f"{base}/api/v1/workflows?limit=20", headers=headers, seconds=2)
        health = run_wrk_cpu(proc.pid, f"{base}/health")
        listed = run_wrk_cpu(
            proc.pid, f"{base}/api/v1/workflows?limit=20", f"list-{tag}", headers=headers
        )
        one = run_wrk_cpu(
            proc.pid, f"{base}/api/v1/workflows/{workflow_id}", f"get-{tag}", headers=headers
        )
        post_headers = dict(headers, **{"Content-Type": "application/json"})
        started = run_wrk_cpu(
            proc.pid,
            f"{base}/api/v1/executions",
            f"post-{tag}",
            method="POST",
            headers=post_headers,
            body=body,
        )
    return [
        (f"product GET /health (middleware only){suffix}", health),
        (f"GET /api/v1/workflows?limit=20 (bearer){suffix}", listed),
        (f"GET /api/v1/workflows/{{id}} (bearer){suffix}", one),
        (f"POST /api/v1/executions (bearer){suffix}", started),
    ]


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it as part of the benchmark: BENCH_PARTS=api python -m bench")
