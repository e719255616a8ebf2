"""Foundation benchmarks: what one API request, one broker hop and one checkpoint cost,
each next to its floor measured in the same run on the same servers.

    make bench            # on throwaway embedded servers
    python -m bench       # against DATABASE_URL / REDIS_URL (uses a scratch database)

Figures are medians and 95th percentiles in milliseconds; ratios are ours / floor.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import redis
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
N = int(os.environ.get("BENCH_N", "300"))
BENCH_DB = "orch_bench"


def timed(fn: Callable[[], object], n: int = N, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def row(
    name: str, ours: list[float], floor: list[float] | None = None, floor_name: str = ""
) -> None:
    med = statistics.median(ours)
    p95 = statistics.quantiles(ours, n=20)[-1]
    line = f"{name:<44} median {med:7.3f} ms   p95 {p95:7.3f} ms"
    if floor is not None:
        fmed = statistics.median(floor)
        line += f"   | floor ({floor_name}) {fmed:7.3f} ms   ratio {med / fmed:5.1f}x"
    print(line, flush=True)


@contextmanager
def process(
    argv: list[str], env: dict[str, str], ready: Callable[[], bool]
) -> Iterator[subprocess.Popen[bytes]]:
    # Its output goes to a file, so a process that did not start says why.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, process_group=0
        )
        try:
            # Generous: on a loaded 2-core machine importing the app alone took 20-30 s.
            deadline = time.monotonic() + 180
            while not _safe(ready):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-3000:]
                    raise RuntimeError(f"{argv[:4]} did not start:\n{tail}")
                time.sleep(0.2)
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _safe(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except Exception:
        return False


def uvicorn(port: int) -> list[str]:
    return [
        *(sys.executable, "-m", "uvicorn", "backend.main:app", "--host", "127.0.0.1"),
        *("--port", str(port), "--no-access-log", "--log-level", "warning"),
        # As the Procfile runs it (see the README's live-progress section).
        *("--ws-per-message-deflate", "false"),
    ]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    admin = os.environ["DATABASE_URL"]
    plain = make_url(admin).set(drivername="postgresql")
    with psycopg.connect(plain.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {BENCH_DB}")
    db_url = plain.set(database=BENCH_DB).render_as_string(hide_password=False)
    env = dict(
        os.environ,
        DATABASE_URL=db_url,
        ENVIRONMENT="test",
        LOG__LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    os.environ.update(env)
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    from backend.kit.celery_app import celery_app

    print(
        f"Orchestration Studio foundation benchmark, n={N} per figure, {os.cpu_count()} cores\n",
        flush=True,
    )

    # BENCH_PARTS picks sections (default: all), e.g. BENCH_PARTS=streams make bench.
    parts = set(os.environ.get("BENCH_PARTS", "foundation,engine,streams,api,analytics").split(","))
    from bench.engine import owner_headers

    headers = owner_headers(db_url)
    if "foundation" in parts:
        # 1. A broker hop: system.ping through Celery and back, against a bare Redis
        #    LPUSH + BRPOP round trip on the same server (the floor any queue pays).
        r = redis.Redis.from_url(os.environ["REDIS_URL"])
        key = f"bench:{uuid.uuid4().hex}"

        def raw_hop() -> None:
            r.lpush(key, b"x")
            r.brpop([key], timeout=5)

        worker = [
            *(sys.executable, "-m", "celery", "-A", "workers", "worker", "--loglevel=WARNING"),
            *("--queues=default", "--concurrency=1", "--pool=solo", "--without-mingle"),
            *("--without-gossip", "--hostname=bench@127.0.0.1"),
        ]
        with process(
            worker,
            env,
            lambda: bool(celery_app.control.ping(destination=["bench@127.0.0.1"], timeout=0.5)),
        ):
            ping = timed(lambda: celery_app.send_task("system.ping").get(timeout=10), n=min(N, 200))
        row("celery round trip (system.ping, result)", ping, timed(raw_hop), "redis lpush+brpop")

        # 2. One API request over real HTTP: /health (no I/O) and /health/ready (PostgreSQL,
        #    Redis and the broker), against a bare TCP connect+request to the same server.
        port = free_port()
        web = uvicorn(port)
        base = f"http://127.0.0.1:{port}"
        with (
            process(web, env, lambda: httpx.get(f"{base}/health").status_code == 200),
            httpx.Client(base_url=base) as client,
        ):
            openapi = timed(lambda: client.get("/openapi.json"))
            health = timed(lambda: client.get("/health"))
            ready = timed(lambda: client.get("/health/ready"), n=min(N, 200))
        row("GET /health (middleware + routing)", health, openapi, "cached /openapi.json")
        row("GET /health/ready (3 dependency checks)", ready, health, "/health")

        # 3. One checkpoint-sized write: an ORM insert in our unit of work against a raw
        #    psycopg INSERT + COMMIT of the same row.
        from backend.config import Settings
        from backend.kit.db import UnitOfWork, create_engine, create_sessionmaker
        from backend.models import Workspace

        async def orm_writes() -> list[float]:
            engine = create_engine(Settings())
            maker = create_sessionmaker(engine)
            out = []
            for i in range(N + 20):
                start = time.perf_counter()
                async with UnitOfWork(maker) as uow:
                    uow.session.add(Workspace(name="b", slug=f"orm-{i}-{uuid.uuid4().hex[:6]}"))
                out.append((time.perf_counter() - start) * 1000)
            await engine.dispose()
            return out[20:]

        orm = asyncio.run(orm_writes())
        with psycopg.connect(db_url) as conn:

            def raw_insert() -> None:
                conn.execute(
                    "INSERT INTO workspaces (id, name, slug) VALUES (%s, 'b', %s)",
                    (uuid.uuid4(), uuid.uuid4().hex),
                )
                conn.commit()

            raw = timed(raw_insert)
        row("checkpoint write (UnitOfWork, ORM insert)", orm, raw, "psycopg insert+commit")

    if "engine" in parts:
        # 4. The engine, end to end through the public API with a real worker.
        from bench.engine import celery_chains, celery_floor, measure

        worker = [
            *(sys.executable, "-m", "celery", "-A", "workers", "worker", "--loglevel=WARNING"),
            *("--queues=high_priority,default", "--concurrency=2", "--without-mingle"),
            *("--without-gossip", "--hostname=bench-engine@127.0.0.1"),
        ]
        port = free_port()
        web = uvicorn(port)
        base = f"http://127.0.0.1:{port}"
        headers = owner_headers(db_url)
        with (
            process(
                worker,
                env,
                lambda: bool(
                    celery_app.control.ping(destination=["bench-engine@127.0.0.1"], timeout=0.5)
                ),
            ),
            process(web, env, lambda: httpx.get(f"{base}/health").status_code == 200),
        ):
            floor = celery_floor()
            chains_per_s = celery_chains()
            figures = asyncio.run(measure(base, headers))
        print()
        print(
            f"{'engine (median of 5 after a warm-up)':<44}"
            f" {'wall, via API':>14} {'server side':>12}"
        )
        for name in ("chain40", "fanout40"):
            wall, server = figures[name]
            print(f"{name:<44} {wall * 1000:11.1f} ms {server * 1000:9.1f} ms")
        wall40, server40 = figures["chain40"]
        per_node = (wall40 / 40 * 1000, server40 / 40 * 1000)
        print(
            f"{'per-node overhead (chain40 / 40)':<44} {per_node[0]:11.2f} ms {per_node[1]:9.2f} ms"
        )
        print(f"{'plain Celery chain of 40 no-op tasks':<44} {floor * 1000:11.1f} ms")
        ratio = (wall40 / floor, server40 / floor)
        print(
            f"{'ratio chain40 / Celery chain (target < 1.0)':<44}"
            f" {ratio[0]:11.2f}x {ratio[1]:9.2f}x"
        )
        batched, admitted = figures["throughput"]
        single, single_admitted = figures["throughput_single"]
        print(
            f"{'throughput, 200 3-node runs, batches of 50':<44} {batched:11.1f} runs/s"
            f"   (admitted in {admitted:.2f} s)"
        )
        print(f"{'plain Celery, 200 chains of 3 tasks':<44} {chains_per_s:11.1f} chains/s")
        print(f"{'ratio runs / Celery chains (target >= 1.2)':<44} {batched / chains_per_s:11.2f}x")
        print(
            f"{'throughput, 200 runs, one POST each':<44} {single:11.1f} runs/s"
            f"   (admitted in {single_admitted:.2f} s: the API's cost, see issue 20)"
        )
        print(f"{'machine load (1, 5, 15 min)':<44} {os.getloadavg()}")

    if "streams" in parts:
        # 5. Live progress: N WebSocket clients following runs, events lost and latency.
        from bench.realtime import measure_streams, slow_server

        # One bench user opens a thousand sockets: lift its per-user API rate limit.
        stream_env = dict(
            env,
            HTTP__ALLOW_PRIVATE_NETWORKS='["127.0.0.1/32"]',
            AUTH__API_RATE_LIMIT="1000000 per hour",
        )
        worker = [
            *(sys.executable, "-m", "celery", "-A", "workers", "worker", "--loglevel=WARNING"),
            *("--queues=high_priority,default", "--concurrency=2", "--without-mingle"),
            *("--without-gossip", "--hostname=bench-streams@127.0.0.1"),
        ]
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        streams = []
        with (
            slow_server() as gate,
            process(
                worker,
                stream_env,
                lambda: bool(
                    celery_app.control.ping(destination=["bench-streams@127.0.0.1"], timeout=0.5)
                ),
            ),
            process(
                # BENCH_STREAM_WS=wsproto|websockets|websockets-sansio: uvicorn's WebSocket
                # implementation for this part (default: uvicorn's choice). The API runs
                # as the Procfile runs it, one process per core (BENCH_STREAM_API_WORKERS):
                # each process fans out to the sockets it accepted.
                [
                    *uvicorn(port),
                    *(["--ws", ws] if (ws := os.environ.get("BENCH_STREAM_WS")) else []),
                    "--workers",
                    os.environ.get("BENCH_STREAM_API_WORKERS", str(os.cpu_count() or 1)),
                ],
                stream_env,
                lambda: httpx.get(f"{base}/health").status_code == 200,
            ) as web_proc,
        ):
            counts = os.environ.get("BENCH_STREAM_CLIENTS", "100,1000")
            # A warm-up run, not reported: a fresh worker's and API's first run pays for
            # lazy imports and first connections (seconds on a loaded machine).
            asyncio.run(measure_streams(base, headers, web_proc.pid, gate, 1))
            for clients in (int(c) for c in counts.split(",")):
                streams.append(
                    asyncio.run(measure_streams(base, headers, web_proc.pid, gate, clients))
                )
        print()
        print(
            f"{'live progress (WebSocket, 2 runs followed)':<44} {'delivered':>10} {'lost':>5}"
            f" {'p50':>8} {'p95':>8} {'max':>8} {'KB/conn':>8} {'connect':>8} {'closed':>6}"
            f" {'CPU api/clients':>16} {'failed':>6}"
        )
        for f in streams:
            label = f"{f['clients']} clients (targets: 0 lost, p95 < "
            label += "50 ms)" if f["clients"] <= 100 else "100 ms)"
            print(
                f"{label:<44} {f['delivered']:>10} {f['lost']:>5}"
                f" {f['p50_ms']:>5.1f} ms {f['p95_ms']:>5.1f} ms {f['max_ms']:>5.0f} ms"
                f" {f['kb_per_conn']:>8.1f} {f['connect_s']:>6.1f} s {f['closed_early']:>6}"
                f" {f['api_cpu_s']:>8.2f}/{f['client_cpu_s']:.2f} s {f['failed']:>6}"
            )

    if "api" in parts:
        # 6. The API's own speed (issue 20): wrk against a bare FastAPI app and the
        #    product. Last: its POSTs leave runs queued that no worker here takes.
        from bench.api import measure as measure_api

        measure_api(process, env, headers, free_port, uvicorn)
        celery_app.control.purge()

    if "analytics" in parts:
        # 7. Analytics (issue 14): 100k runs in one workspace, every endpoint uncached.
        #    Last: it seeds the bench database with a month of runs.
        from bench.analytics import measure as measure_analytics
        from bench.analytics import report as report_analytics

        report_analytics(measure_analytics(db_url))

    with psycopg.connect(plain.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
