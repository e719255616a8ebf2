"""Fault injection on a real stack: a load of runs while workers are SIGKILLed and
restarted, Redis and PostgreSQL are restarted, and two beats fire the same schedules.

Pinned: no run is lost (every run completes), no checkpointed node runs again (the
target sees each (run, node) once, except nodes in flight at a fault, which are
counted apart and must carry the same Idempotency-Key if they carry one), every
schedule slot fires once. Printed: the figures for the README (runs, faults, recovery
time after a kill, run latency). `make faults`; FAULTS_RUNS sets the load.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from backend.config import Settings
from backend.kit.celery_app import create_celery_app
from backend.models import (
    ExecutionTransition,
    Trigger,
    Workflow,
    WorkflowExecution,
    WorkflowVersion,
    Workspace,
)
from tests.faults.stack import Postgres, Proc, Target, Valkey, beat, restart, serve, worker
from tests.support.databases import migrate
from tests.support.procs import python_env

pytestmark = pytest.mark.xdist_group("faults")

RUNS = int(os.environ.get("FAULTS_RUNS", "60"))
SUBMIT_EVERY_S = float(os.environ.get("FAULTS_SUBMIT_EVERY_S", "1.5"))
NODE_S = 0.4  # each side-effect request takes this long at the target
SCHEDULES = 3  # schedule triggers (each every minute) both beats fire
KILLS = 3
PG_DOWN_S = 8.0
REDIS_DOWN_S = 3.0
# Recovery after a kill is bounded by lease + reaper interval; short enough settings
# make it a figure users would not call "stuck".
RECOVERY_BOUND_S = 15.0
# The engine settings the stack runs with (the environment may override them).
ENGINE = {
    "ENGINE__LEASE_S": os.environ.get("ENGINE__LEASE_S", "10"),
    "ENGINE__REAPER_INTERVAL_S": os.environ.get("ENGINE__REAPER_INTERVAL_S", "3"),
    "ENGINE__PENDING_GRACE_S": os.environ.get("ENGINE__PENDING_GRACE_S", "10"),
    "TRIGGERS__DISPATCH_INTERVAL_S": "2",
    # A slot dispatched late (both workers down for a while) still fires: this suite
    # checks each slot fires exactly once, not the misfire policy.
    "TRIGGERS__MISFIRE_GRACE_S": "600",
}


def sync_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def http_node(node_id: str, target: Target) -> dict[str, Any]:
    url = f"{target.base}/hit?e={{{{ execution.id }}}}&n={node_id}&d={NODE_S}"
    return {"id": node_id, "type": "action", "config": {"kind": "http_request", "url": url}}


def load_definition(target: Target) -> dict[str, Any]:
    """start -> a -> (b, c) -> d: four side effects per run, two of them concurrent."""
    nodes = [{"id": "start", "type": "trigger", "config": {"kind": "manual"}}]
    nodes += [http_node(n, target) for n in "abcd"]
    edges = [("start", "a"), ("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]
    return {"nodes": nodes, "connections": [{"source": s, "target": t} for s, t in edges]}


def schedule_definition(target: Target) -> dict[str, Any]:
    nodes = [
        {"id": "start", "type": "trigger", "config": {"kind": "schedule", "cron": "* * * * *"}},
        http_node("x", target),
    ]
    return {"nodes": nodes, "connections": [{"source": "start", "target": "x"}]}


@dataclass
class Fault:
    kind: str  # kill | redis | postgres
    start: float
    end: float


@dataclass
class Recovery:
    owners: set[str]
    killed_at: float
    runs: dict[uuid.UUID, float | None] = field(default_factory=dict)


def owner_pid(owner: str | None) -> str | None:
    """The worker process in a lease token ("host:pid", "host:pid/nonce")."""
    return owner.split("/", 1)[0].rsplit(":", 1)[-1] if owner else None


@pytest.fixture
def logs() -> Path:
    # Outside pytest's temporary directories, which other runs rotate away.
    path = Path(os.environ.get("FAULTS_LOG_DIR") or tempfile.mkdtemp(prefix="orch-faults-"))
    path.mkdir(parents=True, exist_ok=True)
    print(f"\n[faults] logs in {path}")
    return path


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[Postgres, Valkey]]:
    pg = Postgres(tmp_path / "pg", ephemeral=True)
    vk = Valkey(tmp_path / "valkey", ephemeral=True)
    try:
        pg.start()
        vk.start()
        migrate(pg.url)
        yield pg, vk
    finally:
        vk.stop()
        pg.stop()


@pytest.fixture
def target() -> Iterator[Target]:
    with serve(Target()) as t:
        yield t


def test_no_run_lost_and_no_checkpoint_rerun_under_faults(
    servers: tuple[Postgres, Valkey], target: Target, logs: Path
) -> None:
    suite_started = time.monotonic()
    pg, vk = servers
    env = python_env(
        DATABASE_URL=pg.url,
        REDIS_URL=vk.url,
        HTTP__ALLOW_PRIVATE_NETWORKS='["127.0.0.1/32"]',
        **ENGINE,
    )
    lease_s, reaper_s = float(ENGINE["ENGINE__LEASE_S"]), float(ENGINE["ENGINE__REAPER_INTERVAL_S"])
    db = create_engine(sync_url(pg.url), pool_pre_ping=True)
    app = create_celery_app(Settings(redis_url=vk.url, database_url=pg.url))

    # Data: a workspace, the load workflow, SCHEDULES schedule workflows + triggers.
    key = uuid.uuid4().hex[:8]
    now = datetime.now(UTC)
    first_slot = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    with Session(db) as s:
        ws = Workspace(name="faults", slug=f"faults-{key}")
        s.add(ws)
        s.flush()

        def workflow(name: str, definition: dict[str, Any]) -> Workflow:
            wf = Workflow(workspace_id=ws.id, name=name, current_version=1, status="published")
            s.add(wf)
            s.flush()
            s.add(WorkflowVersion(workflow_id=wf.id, number=1, definition=definition))
            return wf

        load_wf = workflow("load", load_definition(target))
        triggers = []
        for i in range(SCHEDULES):
            wf = workflow(f"schedule-{i}", schedule_definition(target))
            trig = Trigger(
                workspace_id=ws.id, workflow_id=wf.id, node_id="start", kind="schedule",
                config={"kind": "schedule", "cron": "* * * * *"}, enabled=True, active=True,
                next_run_at=first_slot,
            )  # fmt: skip
            s.add(trig)
            triggers.append(trig)
        s.commit()
        ws_id, load_id = ws.id, load_wf.id
        trigger_ids = [t.id for t in triggers]

    workers = {name: worker(name, env, logs) for name in ("w1", "w2")}
    beats = [beat(name, env, logs) for name in ("beat1", "beat2")]
    procs: list[Proc] = [*workers.values(), *beats]
    faults: list[Fault] = []
    recoveries: list[Recovery] = []
    submitted: dict[uuid.UUID, float] = {}
    send_failures = 0

    def query(fn: Callable[[Session], Any]) -> Any:
        """A read that waits out a PostgreSQL restart."""
        while True:
            try:
                with Session(db) as s:
                    return fn(s)
            except SQLAlchemyError:
                time.sleep(0.3)

    def poll_recoveries() -> None:
        pending = [(r, e) for r in recoveries for e, t in r.runs.items() if t is None]
        if not pending:
            return
        ids = [e for _, e in pending]
        rows = query(
            lambda s: s.execute(
                select(
                    WorkflowExecution.id, WorkflowExecution.status, WorkflowExecution.lease_owner
                ).where(WorkflowExecution.id.in_(ids))
            ).all()
        )
        state = {r.id: (r.status, owner_pid(r.lease_owner)) for r in rows}
        for rec, eid in pending:
            status, pid = state[eid]
            if status == "completed" or (status == "running" and pid and pid not in rec.owners):
                rec.runs[eid] = time.monotonic() - rec.killed_at

    def idle(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            poll_recoveries()
            time.sleep(0.2)

    def running_on(w: Proc) -> list[uuid.UUID]:
        """The runs the worker's processes hold right now."""
        pids = {str(p) for p in w.pids()}
        rows = query(
            lambda s: s.execute(
                select(WorkflowExecution.id, WorkflowExecution.lease_owner).where(
                    WorkflowExecution.status == "running"
                )
            ).all()
        )
        return [r.id for r in rows if owner_pid(r.lease_owner) in pids]

    def kill() -> None:
        """SIGKILL the worker holding the most runs (waiting a little for one to hold any),
        then start it again."""
        deadline = time.monotonic() + 15
        while True:
            held = {name: running_on(w) for name, w in workers.items()}
            name = max(held, key=lambda n: len(held[n]))
            if held[name] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        w = workers[name]
        owners = {str(p) for p in w.pids()}
        victims = running_on(w)
        killed_at = time.monotonic()
        w.sigkill()
        faults.append(Fault("kill", killed_at, killed_at))
        recoveries.append(Recovery(owners, killed_at, dict.fromkeys(victims)))
        print(f"[faults] SIGKILL {name} holding {len(victims)} run(s)")
        idle(2.0)
        w.start()
        # Back before the next fault: one worker is down at a time.
        ready(name)

    def ready(name: str) -> None:
        w = workers[name]
        end = time.monotonic() + 180
        while time.monotonic() < end:
            assert w.proc is not None and w.proc.poll() is None, w.log.read_text()[-4000:]
            try:
                if app.control.ping(destination=[f"{name}@127.0.0.1"], timeout=0.5):
                    return
            except Exception:  # noqa: S110 - the broker may be restarting
                pass
            poll_recoveries()
        raise AssertionError(f"{name} did not come back")

    def submit_load() -> None:
        nonlocal send_failures
        batch: list[str] = []
        for i in range(RUNS):
            started = time.monotonic()

            def insert(s: Session) -> uuid.UUID:
                ex = WorkflowExecution(
                    workspace_id=ws_id, workflow_id=load_id, version=1, trigger_type="manual"
                )
                s.add(ex)
                s.commit()
                return ex.id

            eid = query(insert)
            submitted[eid] = started
            # Half the load as POST /executions/batch sends it: three runs per message
            # (claimed concurrently by the worker), the rest one message each.
            if i % 6 >= 3:
                batch.append(str(eid))
            message: tuple[str, list[Any]] | None = None
            if i % 6 < 3:
                message = ("workflow.execute", [str(eid)])
            elif len(batch) == 3 or i == RUNS - 1:
                message, batch = ("workflow.execute_many", [batch]), []
            try:
                if message is not None:
                    app.send_task(message[0], args=message[1])
            except Exception:
                # Enqueue failed (Redis down): its runs wait for the reaper, as in production.
                runs = message[1][0] if message is not None else None
                send_failures += len(runs) if isinstance(runs, list) else 1
            time.sleep(max(0.0, SUBMIT_EVERY_S - (time.monotonic() - started)))

    try:
        for p in procs:
            p.start()
        for name in workers:
            ready(name)
        load_started = time.monotonic()
        submitter = threading.Thread(target=submit_load, daemon=True)
        submitter.start()
        span = RUNS * SUBMIT_EVERY_S
        plan: list[tuple[float, Callable[[], None]]] = [
            (0.13 * span, kill),
            (0.30 * span, lambda: redis_restart()),
            (0.47 * span, kill),
            (0.63 * span, lambda: pg_restart()),
            (0.83 * span, kill),
        ]

        def redis_restart() -> None:
            down, up = restart(vk, REDIS_DOWN_S)
            faults.append(Fault("redis", down, up))
            print(f"[faults] Redis down {up - down:.1f} s")

        def pg_restart() -> None:
            down, up = restart(pg, PG_DOWN_S)
            faults.append(Fault("postgres", down, up))
            print(f"[faults] PostgreSQL down {up - down:.1f} s")

        for at, action in plan:
            idle(max(0.0, load_started + at - time.monotonic()))
            action()
        # Recoveries are timed by polling, so the waiting polls too: a bare join here left
        # the last kill's recovery unobserved until the submitter ended (it read ~22 s for
        # runs whose history shows them reaped and claimed again ~10 s after the kill).
        join_deadline = time.monotonic() + span + 120
        while submitter.is_alive() and time.monotonic() < join_deadline:
            idle(0.5)
        assert not submitter.is_alive()

        def unfinished(s: Session) -> int:
            return len(
                s.scalars(
                    select(WorkflowExecution.id).where(
                        WorkflowExecution.workflow_id == load_id,
                        WorkflowExecution.status.in_(("pending", "running")),
                    )
                ).all()
            )

        deadline = time.monotonic() + 240
        while query(unfinished) and time.monotonic() < deadline:
            idle(1.0)
        # Two beats over at least two slots of every schedule.
        slots_until = first_slot + timedelta(minutes=1, seconds=5)
        while datetime.now(UTC) < slots_until:
            idle(1.0)
        idle(3.0)
        beats_stopped = datetime.now(UTC)
        for b in beats:
            b.stop()
        # Schedule runs fired just before the beats stopped may still be running.
        deadline = time.monotonic() + 120

        def schedule_unfinished(s: Session) -> int:
            return len(
                s.scalars(
                    select(WorkflowExecution.id).where(
                        WorkflowExecution.trigger_id.in_(trigger_ids),
                        WorkflowExecution.status.in_(("pending", "running")),
                    )
                ).all()
            )

        while query(schedule_unfinished) and time.monotonic() < deadline:
            idle(1.0)
        crashed = [w.name for w in workers.values() if not w.alive()]
    finally:
        for p in procs:
            p.stop()

    # Figures and checks ------------------------------------------------------------------
    with Session(db) as s:
        runs = s.execute(
            select(
                WorkflowExecution.id,
                WorkflowExecution.status,
                WorkflowExecution.trigger_id,
                WorkflowExecution.scheduled_for,
                WorkflowExecution.created_at,
                WorkflowExecution.finished_at,
                WorkflowExecution.error,
            ).where(WorkflowExecution.workspace_id == ws_id)
        ).all()
    db.dispose()
    load_runs = [r for r in runs if r.trigger_id is None]
    schedule_runs = [r for r in runs if r.trigger_id is not None]
    not_completed = {str(r.id): (r.status, r.error) for r in runs if r.status != "completed"}

    # Side effects per (run, node); a repeat is excused only if its first request was in
    # flight when a fault hit (started within a node's time before it, or during it).
    by_key: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for hit in target.hits:
        by_key[(hit.execution, hit.node)].append(hit)
    in_flight: Counter[str] = Counter()
    rerun: list[tuple[str, str, int]] = []
    key_mismatch: list[tuple[str, str]] = []
    for (eid, node), hits in by_key.items():
        if len(hits) == 1:
            continue
        first = min(h.at for h in hits)
        cause = next(
            (f.kind for f in faults if f.start - NODE_S - 1.0 <= first <= f.end + 1.0), None
        )
        if cause is None:
            rerun.append((eid, node, len(hits)))
        else:
            in_flight[cause] += len(hits) - 1
        keys = {h.idempotency_key for h in hits}
        if keys != {None} and len(keys) != 1:
            key_mismatch.append((eid, node))
    keys_present = any(h.idempotency_key for h in target.hits)

    # Slots: every minute boundary from the first slot until the beats stopped fired
    # exactly once per trigger (the last one may be too close to call).
    expected: list[datetime] = []
    slot = first_slot
    while slot <= beats_stopped - timedelta(seconds=3):
        expected.append(slot)
        slot += timedelta(minutes=1)
    fired: dict[uuid.UUID, Counter[datetime]] = {t: Counter() for t in trigger_ids}
    for r in schedule_runs:
        fired[r.trigger_id][r.scheduled_for] += 1
    slot_problems = {
        str(t): {
            "missing": [s.isoformat() for s in expected if c[s] == 0],
            "doubled": [s.isoformat() for s, n in c.items() if n > 1],
        }
        for t, c in fired.items()
        if any(c[s] == 0 for s in expected) or any(n > 1 for n in c.values())
    }

    recovery_times = [t for r in recoveries for t in r.runs.values() if t is not None]
    slow = {
        slow_run: (t, r.killed_at)
        for r in recoveries
        for slow_run, t in r.runs.items()
        if t is not None and t >= RECOVERY_BOUND_S
    }
    if slow:
        # What the record says happened to each slow one (who reaped it, who claimed
        # it, when), against the kill's wall-clock time: the next failure explains itself.
        offset = time.time() - time.monotonic()
        with Session(db) as s:
            for slow_id, (took, killed_at) in slow.items():
                killed = datetime.fromtimestamp(killed_at + offset, UTC)
                print(
                    f"[faults] slow recovery {slow_id}: {took:.1f} s, killed {killed:%H:%M:%S.%f}"
                )
                for h in s.scalars(
                    select(ExecutionTransition)
                    .where(ExecutionTransition.execution_id == slow_id)
                    .order_by(ExecutionTransition.id)
                ):
                    print(
                        f"    {h.at:%H:%M:%S.%f} {h.node_id or 'run'}: {h.from_status} -> "
                        f"{h.to_status} by {h.actor} ({h.reason})"
                    )
    unrecovered = sum(1 for r in recoveries for t in r.runs.values() if t is None)
    latencies = sorted(
        (r.finished_at - r.created_at).total_seconds() for r in load_runs if r.finished_at
    )
    elapsed = time.monotonic() - suite_started
    kills = sum(1 for f in faults if f.kind == "kill")
    print(
        "\n[faults] figures\n"
        f"  engine: lease {lease_s:g} s, reaper every {reaper_s:g} s, "
        f"pending grace {ENGINE['ENGINE__PENDING_GRACE_S']} s\n"
        f"  runs: {len(load_runs)} load ({RUNS} submitted, {send_failures} enqueues failed) + "
        f"{len(schedule_runs)} scheduled; completed "
        f"{len(runs) - len(not_completed)}/{len(runs)}\n"
        f"  faults: {kills} worker SIGKILLs, "
        f"{sum(f.kind == 'redis' for f in faults)} Redis restart ({REDIS_DOWN_S:g} s down), "
        f"{sum(f.kind == 'postgres' for f in faults)} PostgreSQL restart ({PG_DOWN_S:g} s down), "
        f"2 beats\n"
        f"  side effects: {len(target.hits)} requests for {len(by_key)} (run, node) pairs; "
        f"checkpointed nodes re-run: {len(rerun)}; repeats of nodes in flight at a fault: "
        f"{dict(in_flight) or 0}; Idempotency-Key "
        f"{'present, same on every repeat' if keys_present and not key_mismatch else 'absent' if not keys_present else 'DIFFERS on ' + str(len(key_mismatch))}\n"  # noqa: E501
        f"  recovery after a kill (SIGKILL -> running on another worker): "
        + (
            f"max {max(recovery_times):.1f} s, median {statistics.median(recovery_times):.1f} s "
            f"over {len(recovery_times)} run(s)"
            if recovery_times
            else "no run was in flight"
        )
        + f"{f', {unrecovered} never recovered' if unrecovered else ''}\n"
        f"  run latency (created -> finished): "
        + (
            f"median {statistics.median(latencies):.2f} s, max {max(latencies):.2f} s"
            if latencies
            else "n/a"
        )
        + f"\n  schedule slots: {len(expected)} per trigger x {SCHEDULES} triggers\n"
        f"  suite time: {elapsed:.0f} s"
    )
    assert crashed == [], f"workers that exited on their own: {crashed}"
    assert len(load_runs) == RUNS
    assert not_completed == {}, not_completed
    assert rerun == [], f"checkpointed nodes that ran again: {rerun}"
    assert key_mismatch == [], key_mismatch
    assert all(len(hits) >= 1 for hits in by_key.values())
    assert len({(e, n) for (e, n) in by_key if n in "abcd"}) == 4 * RUNS
    assert slot_problems == {}, slot_problems
    assert len(expected) >= 1
    assert kills == KILLS
    assert unrecovered == 0
    if lease_s + reaper_s + 1.0 < RECOVERY_BOUND_S and recovery_times:
        assert max(recovery_times) < RECOVERY_BOUND_S, recovery_times
