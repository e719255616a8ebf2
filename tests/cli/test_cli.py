"""The `studio` CLI as a person or a script runs it: a real process against a real
uvicorn and Celery worker, signing in with a mailed code, keeping workflows in files,
following runs over the WebSocket. Exit codes and --json output are part of the
contract."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.definitions import chain
from tests.support.mail import Mailbox, code_in
from tests.support.procs import PYTHON, STARTUP_S, free_port, python_env
from tests.support.target import http_target

pytestmark = [pytest.mark.xdist_group("crossprocess-b"), pytest.mark.usefixtures("worker_name")]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


Studio = Callable[..., Result]


def _runner(api: str, config_dir: Path, **env: str) -> Studio:
    def studio(
        *args: str, stdin: str | None = None, extra_env: dict[str, str] | None = None
    ) -> Result:
        proc = subprocess.run(
            [PYTHON, "-m", "studio", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            env=python_env(
                **{
                    "STUDIO_CONFIG_DIR": str(config_dir),
                    "STUDIO_URL": api,
                    **env,
                    **(extra_env or {}),
                }
            ),
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    return studio


@pytest.fixture(scope="module")
def workspace_id(owner: dict[str, str]) -> str:
    return owner["X-Workspace-ID"]


@pytest.fixture(scope="module")
def api_key(api: str, workspace_id: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    studio = _runner(api, tmp_path_factory.mktemp("admin"))
    made = studio(
        "admin", "create-api-key", "--workspace", workspace_id, "--role", "editor", "--json"
    )
    assert made.code == 0, made.stderr
    body = made.json()
    assert body["workspace_id"] == workspace_id and body["role"] == "editor"
    assert body["key"].startswith("osk_")
    return str(body["key"])


@pytest.fixture
def studio(api: str, api_key: str, tmp_path: Path) -> Studio:
    """The CLI acting with an editor's API key (as a CI job would)."""
    return _runner(api, tmp_path / "config", STUDIO_API_KEY=api_key)


def _file(tmp_path: Path, definition: dict[str, Any], name: str = "wf.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"name": f"cli {uuid.uuid4().hex[:6]}", **definition}))
    return path


def _pushed(studio: Studio, path: Path) -> str:
    pushed = studio("workflows", "push", str(path), "--json")
    assert pushed.code == 0, pushed.stderr
    return str(pushed.json()["workflow"]["id"])


def test_login_with_a_mailed_code_keeps_tokens_for_the_owner_only(
    api: str, mailbox: Mailbox, tmp_path: Path
) -> None:
    email = f"cli-{uuid.uuid4().hex[:8]}@example.com"
    config_dir = tmp_path / "config"
    before = mailbox.count()
    proc = subprocess.Popen(
        [PYTHON, "-m", "studio", "login", "--email", email],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=python_env(STUDIO_CONFIG_DIR=str(config_dir), STUDIO_URL=api),
    )
    try:
        code = code_in(mailbox.wait_for(email, after=before))
        stdout, stderr = proc.communicate(f"{code}\n", timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert email in stdout

    stored = config_dir / "config.json"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert stat.S_IMODE(config_dir.stat().st_mode) == 0o700
    server = json.loads(stored.read_text())["servers"][api]
    assert server["access_token"] and server["refresh_token"]

    studio = _runner(api, config_dir)
    me = studio("whoami", "--json")
    assert me.code == 0, me.stderr
    assert me.json()["user"]["email"] == email
    spaces = studio("workspaces", "--json")
    assert spaces.code == 0
    personal = next(w for w in spaces.json()["items"] if w["is_personal"])
    assert me.json()["workspace_id"] == personal["id"]

    # An expired access token is refreshed (and the rotated pair stored) on its own.
    server["access_token"] = "expired"
    server["access_expires_at"] = 0
    stored.write_text(json.dumps({"current_url": api, "servers": {api: server}}))
    listed = studio("workflows", "list", "--json")
    assert listed.code == 0, listed.stderr
    assert listed.json()["total"] == 0
    refreshed = json.loads(stored.read_text())["servers"][api]
    assert refreshed["refresh_token"] != server["refresh_token"]

    out = studio("logout")
    assert out.code == 0
    assert api not in json.loads(stored.read_text())["servers"]
    # The session ended on the server: the old refresh token is dead.
    r = httpx.post(
        f"{api}/api/v1/auth/refresh", json={"refresh_token": refreshed["refresh_token"]}, timeout=10
    )
    assert r.status_code == 401
    assert studio("whoami").code == 4


def test_a_wrong_code_is_asked_again(api: str, mailbox: Mailbox, tmp_path: Path) -> None:
    email = f"cli-{uuid.uuid4().hex[:8]}@example.com"
    before = mailbox.count()
    proc = subprocess.Popen(
        [PYTHON, "-m", "studio", "login", "--email", email],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=python_env(STUDIO_CONFIG_DIR=str(tmp_path), STUDIO_URL=api),
    )
    try:
        code = code_in(mailbox.wait_for(email, after=before))
        wrong = "000000" if code != "000000" else "111111"
        _stdout, stderr = proc.communicate(f"{wrong}\n{code}\n", timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "invalid or expired code" in stderr


def test_workflow_files_push_pull_validate_and_publish(studio: Studio, tmp_path: Path) -> None:
    path = _file(tmp_path, chain(2))
    first = studio("workflows", "push", str(path), "--json")
    assert first.code == 0, first.stderr
    assert first.json()["action"] == "created"
    workflow_id = first.json()["workflow"]["id"]

    pulled = tmp_path / "pulled.yaml"
    assert studio("workflows", "pull", workflow_id, "-o", str(pulled)).code == 0
    document = yaml.safe_load(pulled.read_text())
    assert document["source_workflow_id"] == workflow_id
    assert [n["id"] for n in document["definition"]["nodes"]] == ["start", "n0", "n1"]
    assert "exported_at" not in document  # a file in Git changes only with the workflow

    # The pulled file pushes back onto the same workflow: unchanged, no new version.
    again = studio("workflows", "push", str(pulled), "--json")
    assert (again.code, again.json()["action"]) == (0, "unchanged")
    assert again.json()["workflow"]["version"] == 1

    # Edited in the file, pushed: a new version of the same workflow.
    document["definition"]["nodes"].append(
        {"id": "n2", "type": "logic", "config": {"kind": "transform", "template": "{{ 7 }}"}}
    )
    document["definition"]["connections"].append({"source": "n1", "target": "n2"})
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(document))
    assert studio("workflows", "validate", str(edited)).code == 0
    updated = studio("workflows", "push", str(edited), "--publish", "--json")
    assert updated.code == 0, updated.stderr
    body = updated.json()
    assert (body["action"], body["workflow"]["id"]) == ("updated", workflow_id)
    assert (body["workflow"]["version"], body["workflow"]["status"]) == (2, "published")

    shown = studio("workflows", "show", workflow_id, "--json")
    assert [n["id"] for n in shown.json()["nodes"]] == ["start", "n0", "n1", "n2"]
    listed = studio("workflows", "list", "--status", "published", "--json")
    assert workflow_id in [w["id"] for w in listed.json()["items"]]
    table = studio("workflows", "list")
    assert table.code == 0 and workflow_id in table.stdout


def test_validate_names_every_problem_and_exits_2(studio: Studio, tmp_path: Path) -> None:
    broken = _file(
        tmp_path,
        {
            "nodes": [
                {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
                {"id": "a", "type": "logic", "config": {"kind": "nonsense"}},
            ],
            "connections": [{"source": "start", "target": "ghost"}],
        },
    )
    checked = studio("workflows", "validate", str(broken), "--json")
    assert checked.code == 2
    report = checked.json()
    assert report["valid"] is False
    assert {p["node_id"] for p in report["problems"]} >= {"a"}
    assert any("ghost" in p["message"] for p in report["problems"])
    human = studio("workflows", "validate", str(broken))
    assert human.code == 2 and "ghost" in human.stderr

    not_yaml = tmp_path / "bad.yaml"
    not_yaml.write_text("name: [unclosed")
    bad = studio("workflows", "push", str(not_yaml), "--json")
    assert bad.code == 2
    assert json.loads(bad.stderr)["error"] == "invalid_file"

    # The server refuses what the file cannot know (an agent of another workspace).
    foreign = _file(
        tmp_path,
        {
            "nodes": [
                {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
                {"id": "a", "type": "agent", "config": {"agent_id": str(uuid.uuid4())}},
            ],
            "connections": [{"source": "start", "target": "a"}],
        },
        "foreign.yaml",
    )
    refused = studio("workflows", "push", str(foreign), "--json")
    assert refused.code == 2, refused.stderr
    error = json.loads(refused.stderr)
    assert (error["status"], error["error"]) == (422, "validation_error")


def test_run_wait_exits_with_the_runs_status(studio: Studio, tmp_path: Path) -> None:
    workflow_id = _pushed(studio, _file(tmp_path, chain(3)))
    done = studio("run", workflow_id, "--input", '{"x": 10}', "--wait", "--json")
    assert done.code == 0, done.stderr
    body = done.json()
    assert (body["status"], body["output"]) == ("completed", {"n2": 13})

    failing = _pushed(
        studio,
        _file(
            tmp_path,
            {
                "nodes": [
                    {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
                    {
                        "id": "boom",
                        "type": "logic",
                        "config": {"kind": "transform", "template": "{{ 1 // 0 }}"},
                        "retry": {"max_retries": 0},
                    },
                ],
                "connections": [{"source": "start", "target": "boom"}],
            },
            "failing.yaml",
        ),
    )
    failed = studio("run", failing, "--wait", "--json")
    assert failed.code == 1, failed.stderr
    assert failed.json()["status"] == "failed"
    human = studio("run", failing, "--wait")
    assert human.code == 1
    assert "failed" in human.stdout

    # Input from a file; a bad one is refused before anything starts.
    given = tmp_path / "input.json"
    given.write_text('{"x": 1}')
    from_file = studio("run", workflow_id, "--input", f"@{given}", "--wait", "--json")
    assert from_file.json()["output"] == {"n2": 4}
    assert studio("run", workflow_id, "--input", "[1, 2]").code == 2
    assert studio("run", workflow_id, "--input", "{nope").code == 2


def test_run_follow_shows_each_node_live_and_as_json_lines(studio: Studio, tmp_path: Path) -> None:
    workflow_id = _pushed(studio, _file(tmp_path, chain(3)))
    followed = studio("run", workflow_id, "--input", '{"x": 1}', "--follow")
    assert followed.code == 0, followed.stderr
    lines = followed.stdout.splitlines()
    for node in ("start", "n0", "n1", "n2"):
        assert any(line.split()[:2] == [node, "completed"] for line in lines), followed.stdout
    assert lines[-1].startswith("run ") and " completed" in lines[-1]

    streamed = studio("run", workflow_id, "--input", '{"x": 1}', "--follow", "--json")
    assert streamed.code == 0, streamed.stderr
    events = [json.loads(line) for line in streamed.stdout.splitlines()]
    seqs = [e["seq"] for e in events if e.get("type") != "snapshot"]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    completed = {
        e["node_id"]
        for e in events
        if e.get("type") == "node.status" and e["status"] == "completed"
    }
    assert completed == {"start", "n0", "n1", "n2"}
    assert events[-1]["type"] == "execution.status" and events[-1]["status"] == "completed"


def test_executions_list_show_logs_cancel_and_retry(studio: Studio, tmp_path: Path) -> None:
    with http_target() as target:
        slow = {
            "nodes": [
                {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
                {
                    "id": "wait",
                    "type": "action",
                    "config": {"kind": "http_request", "url": f"{target.base}/slow/20"},
                },
            ],
            "connections": [{"source": "start", "target": "wait"}],
        }
        workflow_id = _pushed(studio, _file(tmp_path, slow))
        started = studio("run", workflow_id, "--json")
        assert started.code == 0, started.stderr
        run_id = started.json()["id"]

        # --timeout ends the wait (exit 8), not the run.
        waited = studio("executions", "show", run_id, "--wait", "--timeout", "1", "--json")
        assert waited.code == 8, waited.stderr
        assert json.loads(waited.stderr)["error"] == "timeout"

        cancelled = studio("executions", "cancel", run_id, "--json")
        assert cancelled.code == 0, cancelled.stderr
        ended = studio("executions", "show", run_id, "--wait", "--json")
        assert ended.code == 3, ended.stderr
        assert ended.json()["status"] == "cancelled"

        listed = studio("executions", "list", "--workflow", workflow_id, "--json")
        assert [e["id"] for e in listed.json()["items"]] == [run_id]
        logs = studio("executions", "logs", run_id, "--json")
        assert logs.code == 0
        assert any("cancel" in entry["message"] for entry in logs.json())
        human_logs = studio("executions", "logs", run_id)
        assert human_logs.code == 0 and "cancel" in human_logs.stdout

        retried = studio("executions", "retry", run_id, "--json")
        assert retried.code == 0, retried.stderr
        retry_id = retried.json()["id"]
        assert retry_id != run_id
        assert studio("executions", "cancel", retry_id).code == 0
        # A run that ended cannot be cancelled again: 409 is exit 6.
        assert studio("executions", "show", retry_id, "--wait").code == 3
        assert studio("executions", "cancel", retry_id).code == 6


def test_exit_codes_for_what_went_wrong(api: str, studio: Studio, tmp_path: Path) -> None:
    missing = studio("workflows", "show", str(uuid.uuid4()), "--json")
    assert missing.code == 5
    assert json.loads(missing.stderr) | {"request_id": None} == {
        "error": "not_found",
        "detail": "workflow not found",
        "status": 404,
        "request_id": None,
    }
    assert studio("workflows", "show", "not-an-id").code == 2
    assert studio("workflows", "nonsense").code == 2

    forged = studio("workflows", "list", "--json", extra_env={"STUDIO_API_KEY": "osk_forged"})
    assert forged.code == 4
    assert json.loads(forged.stderr)["error"] == "unauthenticated"
    nobody = _runner(api, tmp_path / "nobody")("workflows", "list")
    assert nobody.code == 4 and "studio login" in nobody.stderr

    closed = f"http://127.0.0.1:{free_port()}"
    unreachable = studio("workflows", "list", "--json", extra_env={"STUDIO_URL": closed})
    assert unreachable.code == 7
    assert json.loads(unreachable.stderr)["error"] == "unreachable"

    # A viewer's key may look but not run.
    viewer = _runner(api, tmp_path / "viewer")
    made = viewer(
        "admin", "create-api-key", "--workspace", _workspace(studio), "--role", "viewer", "--json"
    )
    workflow_id = _pushed(studio, _file(tmp_path, chain(1)))
    refused = viewer("run", workflow_id, "--json", extra_env={"STUDIO_API_KEY": made.json()["key"]})
    assert refused.code == 4
    assert json.loads(refused.stderr)["error"] == "permission_denied"


def _workspace(studio: Studio) -> str:
    page = studio("workflows", "list", "--json").json()
    return str(page["items"][0]["workspace_id"])


def test_admin_key_for_a_new_address_creates_the_user_and_workspace(
    api: str, tmp_path: Path
) -> None:
    studio = _runner(api, tmp_path)
    email = f"bootstrap-{uuid.uuid4().hex[:8]}@example.com"
    made = studio("admin", "create-api-key", "--email", email, "--json")
    assert made.code == 0, made.stderr
    body = made.json()
    assert (body["created_by"], body["created_user"], body["role"]) == (email, True, "editor")
    # The key alone on stdout without --json, for KEY=$(studio admin create-api-key ...).
    again = studio("admin", "create-api-key", "--email", email, "--name", "ci")
    assert again.code == 0, again.stderr
    assert again.stdout.strip().startswith("osk_") and len(again.stdout.split()) == 1
    user_studio = _runner(api, tmp_path / "user", STUDIO_API_KEY=again.stdout.strip())
    assert user_studio("workflows", "list", "--json").json()["total"] == 0

    # With several workspaces and nothing to choose by, it asks instead of guessing.
    ambiguous = studio("admin", "create-api-key", "--json")
    assert ambiguous.code == 2
    assert json.loads(ambiguous.stderr)["error"] == "ambiguous_workspace"
    assert studio("admin", "create-api-key", "--workspace", str(uuid.uuid4())).code == 5
    assert studio("admin", "create-api-key", "--email", email, "--role", "boss").code == 2


def test_a_follow_resumes_after_the_server_recycles_the_socket(
    api: str, studio: Studio, tmp_path: Path, database: str
) -> None:
    """A second uvicorn whose sockets live one second (REALTIME__MAX_CONNECTION_S): the
    CLI reconnects and resumes from its last seq, so every event shows exactly once."""
    from tests.support.procs import http_ok, running, wait_for

    port = free_port()
    short = f"http://127.0.0.1:{port}"
    log = tmp_path / "uvicorn.log"
    argv = [PYTHON, "-m", "uvicorn", "backend.main:app", "--host", "127.0.0.1", "--port", str(port)]
    with (
        http_target() as target,
        running(argv, env=python_env(REALTIME__MAX_CONNECTION_S="1"), log=log) as proc,
    ):
        wait_for(
            http_ok(f"{short}/health"), timeout_s=STARTUP_S, what="uvicorn", proc=proc, log=log
        )
        nodes = [{"id": "start", "type": "trigger", "config": {"kind": "manual"}}]
        connections = []
        for i in range(3):
            nodes.append(
                {
                    "id": f"s{i}",
                    "type": "action",
                    "config": {"kind": "http_request", "url": f"{target.base}/slow/0.7"},
                }
            )
            connections.append({"source": nodes[-2]["id"], "target": f"s{i}"})
        workflow_id = _pushed(studio, _file(tmp_path, {"nodes": nodes, "connections": connections}))
        started = time.monotonic()
        streamed = studio("run", workflow_id, "--follow", "--json", extra_env={"STUDIO_URL": short})
        assert streamed.code == 0, streamed.stderr + log.read_text()[-2000:]
        assert time.monotonic() - started > 2  # it outlived at least one socket
        events = [json.loads(line) for line in streamed.stdout.splitlines()]
        seqs = [e["seq"] for e in events if e.get("type") != "snapshot"]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
        assert events[-1]["status"] == "completed"


def test_help_lists_every_command(studio: Studio) -> None:
    shown = studio("--help")
    assert shown.code == 0
    for command in (
        "login",
        "logout",
        "whoami",
        "run",
        "workspaces",
        "workflows",
        "executions",
        "admin",
    ):
        assert command in shown.stdout
    assert os.environ.get("STUDIO_API_KEY") is None  # the suite's own env stays clean
