"""The `studio` command: sign in, pick a workspace, keep workflows in files, start runs
and watch them live, look at past runs. Everything goes through the public API
(`studio.api`), except `studio admin`, which runs where the database is.

`--json` on any command prints the API's JSON on stdout (errors as JSON on stderr);
the exit code says how it went (see `studio.output.Exit`)."""

from __future__ import annotations

import functools
import json
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from studio import config as cfg
from studio import files
from studio.api import Client, Context, resolve_url
from studio.follow import RunState, choose_view, follow
from studio.output import (
    RUN_EXIT,
    Exit,
    Failure,
    cost,
    duration,
    emit_json,
    err,
    escape,
    fail,
    out,
    report,
    short_time,
    table,
    tokens,
)

app = typer.Typer(
    name="studio",
    help="Orchestration Studio from the command line: workflows, runs, live progress.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
workspaces_app = typer.Typer(
    rich_markup_mode="markdown", help="List your workspaces, or choose the one to work in."
)
workflows_app = typer.Typer(
    rich_markup_mode="markdown", help="Workflows, kept as YAML or JSON files.", no_args_is_help=True
)
executions_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Runs: list, inspect, follow, cancel, retry.",
    no_args_is_help=True,
)
tasks_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Tasks people decide: approval steps runs wait on, and manual tasks.",
    no_args_is_help=True,
)
admin_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Run where the database is: bootstrap for automation.",
    no_args_is_help=True,
)
app.add_typer(workspaces_app, name="workspaces")
app.add_typer(workflows_app, name="workflows")
app.add_typer(executions_app, name="executions")
app.add_typer(tasks_app, name="tasks")
app.add_typer(admin_app, name="admin")

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print JSON for scripts (errors as JSON on stderr).")
]
Limit = Annotated[int, typer.Option(min=1, max=100, help="How many to list.")]
Offset = Annotated[int, typer.Option(min=0, help="How many to skip.")]


class State:
    url_option: str | None = None
    workspace_option: str | None = None
    as_json: bool = False


STATE = State()
F = TypeVar("F", bound=Callable[..., Any])


def handled(func: F) -> F:
    """Every command ends the same way on a Failure: the error (text or JSON) on stderr
    and its exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("as_json"):
            STATE.as_json = True
        try:
            return func(*args, **kwargs)
        except Failure as failure:
            report(failure, as_json=STATE.as_json)
            raise typer.Exit(int(failure.code)) from None

    return wrapper  # type: ignore[return-value]


def context() -> Context:
    config = cfg.load()
    return Context(
        url=resolve_url(STATE.url_option, config),
        config=config,
        workspace_override=STATE.workspace_option,
        as_json=STATE.as_json,
    )


@app.callback()
def main(
    url: Annotated[
        str | None,
        typer.Option(help="The server (default: the last one you signed in to, or $STUDIO_URL)."),
    ] = None,
    workspace: Annotated[
        str | None,
        typer.Option(help="Act in this workspace id for this command ($STUDIO_WORKSPACE)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Orchestration Studio from the command line.

    Exit codes: 0 ok (or the run completed), 1 the run failed, 2 bad usage or invalid
    input, 3 the run was cancelled, 4 not signed in or not allowed, 5 not found,
    6 conflict (e.g. an archived workflow), 7 server unreachable or unavailable,
    8 --timeout passed before the run ended.
    """
    import os

    STATE.url_option = url
    STATE.workspace_option = workspace or os.environ.get("STUDIO_WORKSPACE") or None
    STATE.as_json = as_json


# Signing in --------------------------------------------------------------------------


def _choose_workspace(client: Client) -> None:
    """After signing in: keep the workspace in use if it is still ours, else take the
    personal one (every person has one)."""
    page = client.call("GET", "/workspaces", params={"limit": 100}, workspace=False)
    items = page["items"]
    server = client.ctx.server
    current = next((w for w in items if w["id"] == server.workspace_id), None)
    chosen = current or next((w for w in items if w["is_personal"]), items[0] if items else None)
    if chosen is not None:
        server.workspace_id, server.workspace_name = chosen["id"], chosen["name"]
    cfg.save(client.ctx.config)


@app.command()
@handled
def login(
    email: Annotated[str | None, typer.Option(help="Your address; a code is mailed to it.")] = None,
    code: Annotated[
        str | None, typer.Option(help="The code from the mail (else you are asked for it).")
    ] = None,
    api_key: Annotated[
        bool,
        typer.Option(
            "--api-key",
            help="Sign in with an API key instead (asked for, or read from $STUDIO_API_KEY).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Sign in with a one-time code sent by mail (or with an API key). Tokens are kept
    in your config directory, readable by you only, and refreshed as needed."""
    import os

    ctx = context()
    with Client(ctx) as client:
        if api_key:
            key = os.environ.get("STUDIO_API_KEY") or typer.prompt("API key", hide_input=True)
            key = key.strip()
            server = ctx.server
            server.api_key, server.access_token, server.refresh_token = key, None, None
            server.access_expires_at = server.workspace_id = server.workspace_name = None
            # Proves the key before keeping it: any workspace route answers for it.
            client.call("GET", "/workflows", params={"limit": 1}, workspace=False)
            ctx.config.current_url = ctx.url
            cfg.save(ctx.config)
            result = {"url": ctx.url, "credential": "api_key", "prefix": key[:12]}
            if as_json:
                emit_json(result)
            else:
                out.print(f"Signed in to {ctx.url} with API key {escape(key[:12])}...")
            return
        address = (email or typer.prompt("Email")).strip()
        client.call(
            "POST",
            "/auth/request-otp",
            json={"email": address, "purpose": "login"},
            auth=False,
            workspace=False,
        )
        if not as_json:
            err.print(f"A sign-in code was sent to {escape(address)}.")
        for attempt in range(3):
            entered = (code if code and attempt == 0 else None) or typer.prompt("Code")
            try:
                pair = client.call(
                    "POST",
                    "/auth/verify-otp",
                    json={"email": address, "code": entered.strip()},
                    auth=False,
                    workspace=False,
                )
                break
            except Failure as failure:
                retry = failure.code in (Exit.AUTH, Exit.USAGE) and attempt < 2 and code is None
                if not retry:
                    raise
                err.print(f"[red]{escape(str(failure.body.get('detail')))}[/]; try again.")
        client.store_pair(pair)
        _choose_workspace(client)
        server = ctx.server
        result = {
            "url": ctx.url,
            "email": server.email,
            "workspace_id": server.workspace_id,
            "workspace_name": server.workspace_name,
        }
        if as_json:
            emit_json(result)
        else:
            out.print(
                f"Signed in to {ctx.url} as {escape(server.email or '')}; "
                f"workspace: {escape(server.workspace_name or '-')} ({server.workspace_id})"
            )


@app.command()
@handled
def logout(as_json: JsonOpt = False) -> None:
    """End the session on the server and forget the stored credential."""
    ctx = context()
    server = ctx.server
    with Client(ctx) as client:
        if server.access_token and not ctx.api_key:
            try:
                client.call("POST", "/auth/logout", workspace=False)
            except Failure as failure:
                if failure.code != Exit.AUTH:
                    raise
    ctx.config.servers.pop(ctx.url, None)
    cfg.save(ctx.config)
    if as_json:
        emit_json({"url": ctx.url, "signed_out": True})
    else:
        out.print(f"Signed out of {ctx.url}.")


@app.command()
@handled
def whoami(as_json: JsonOpt = False) -> None:
    """Who the CLI acts as, where, and in which workspace."""
    ctx = context()
    with Client(ctx) as client:
        if ctx.api_key:
            client.call("GET", "/workflows", params={"limit": 1})
            body: dict[str, Any] = {
                "url": ctx.url,
                "credential": "api_key",
                "prefix": ctx.api_key[:12],
            }
        else:
            me = client.call("GET", "/auth/me", workspace=False)
            body = {
                "url": ctx.url,
                "credential": "session",
                "user": me,
                "workspace_id": ctx.workspace_id,
                "workspace_name": ctx.server.workspace_name,
            }
    if as_json:
        emit_json(body)
    elif ctx.api_key:
        out.print(f"API key {escape(body['prefix'])}... at {ctx.url}")
    else:
        out.print(
            f"{escape(body['user']['email'])} at {ctx.url}; workspace "
            f"{escape(str(body['workspace_name'] or '-'))} ({body['workspace_id']})"
        )


# Workspaces -----------------------------------------------------------------------------


@workspaces_app.callback(invoke_without_command=True)
@handled
def workspaces(typer_ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List the workspaces you belong to (the one in use is marked)."""
    if typer_ctx.invoked_subcommand is not None:
        return
    ctx = context()
    if ctx.api_key:
        raise fail(
            Exit.USAGE,
            "api_key",
            "an API key works in its own workspace only; listing workspaces needs `studio login`",
        )
    with Client(ctx) as client:
        page = client.call("GET", "/workspaces", params={"limit": 100}, workspace=False)
    if as_json:
        emit_json(page)
        return
    table(
        ["", "id", "name", "role", "personal"],
        [
            [
                "*" if w["id"] == ctx.workspace_id else "",
                w["id"],
                w["name"],
                w["role"],
                w["is_personal"],
            ]
            for w in page["items"]
        ],
    )


@workspaces_app.command("use")
@handled
def workspaces_use(
    workspace: Annotated[str, typer.Argument(help="The workspace's id or slug.")],
    as_json: JsonOpt = False,
) -> None:
    """Work in this workspace from now on."""
    ctx = context()
    with Client(ctx) as client:
        page = client.call("GET", "/workspaces", params={"limit": 100}, workspace=False)
    found = next((w for w in page["items"] if workspace in (w["id"], w["slug"])), None)
    if found is None:
        raise fail(Exit.NOT_FOUND, "not_found", f"no workspace {workspace!r} among yours")
    ctx.server.workspace_id, ctx.server.workspace_name = found["id"], found["name"]
    cfg.save(ctx.config)
    if as_json:
        emit_json(found)
    else:
        out.print(f"Using workspace {escape(found['name'])} ({found['id']}).")


# Workflows ------------------------------------------------------------------------------


def _uuid(value: str, what: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise fail(
            Exit.USAGE, "validation_error", f"{value!r} is not a {what} id", field=what
        ) from None


@workflows_app.command("list")
@handled
def workflows_list(
    status: Annotated[str | None, typer.Option(help="draft, published or archived.")] = None,
    tag: Annotated[str | None, typer.Option()] = None,
    query: Annotated[str | None, typer.Option("--query", "-q", help="Search the names.")] = None,
    limit: Limit = 50,
    offset: Offset = 0,
    as_json: JsonOpt = False,
) -> None:
    """The workspace's workflows, most recently changed first."""
    with Client(context()) as client:
        page = client.call(
            "GET",
            "/workflows",
            params={"status": status, "tag": tag, "q": query, "limit": limit, "offset": offset},
            needs_workspace=True,
        )
    if as_json:
        emit_json(page)
        return
    table(
        ["id", "name", "status", "version", "updated"],
        [
            [w["id"], w["name"], w["status"], w["version"], short_time(w["updated_at"])]
            for w in page["items"]
        ],
    )
    if page["total"] > offset + len(page["items"]):
        err.print(
            f"[dim]{page['total']} in all; --offset {offset + len(page['items'])} for more[/]"
        )


@workflows_app.command("show")
@handled
def workflows_show(workflow_id: str, as_json: JsonOpt = False) -> None:
    """A workflow: its settings and nodes."""
    with Client(context()) as client:
        body = client.call("GET", f"/workflows/{_uuid(workflow_id, 'workflow')}")
    if as_json:
        emit_json(body)
        return
    out.print(f"[bold]{escape(body['name'])}[/] ({body['id']})")
    out.print(
        f"status {body['status']}, version {body['version']}, "
        f"updated {short_time(body['updated_at'])}"
    )
    if body["description"]:
        out.print(escape(body["description"]))
    incoming: dict[str, list[str]] = {}
    for c in body["connections"]:
        incoming.setdefault(c["target"], []).append(
            c["source"] + (f" [{c['branch']}]" if c.get("branch") else "")
        )
    table(
        ["node", "type", "kind", "after"],
        [
            [
                n["id"],
                n["type"],
                (n.get("config") or {}).get("kind", ""),
                ", ".join(incoming.get(n["id"], [])),
            ]
            for n in body["nodes"]
        ],
    )


@workflows_app.command("pull")
@handled
def workflows_pull(
    workflow_id: str,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write here (.yaml/.yml or .json); else print YAML."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Save a workflow as a file (the export document), to keep it in Git."""
    with Client(context()) as client:
        document = client.call("GET", f"/workflows/{_uuid(workflow_id, 'workflow')}/export")
    # The export time changes on every pull; a file in Git should change only when
    # the workflow does.
    document.pop("exported_at", None)
    if output is not None:
        files.write(output, document)
        if as_json:
            emit_json({"path": str(output), "workflow_id": document.get("source_workflow_id")})
        else:
            err.print(f"Wrote {escape(str(output))} (version {document.get('source_version')}).")
    elif as_json:
        emit_json(document)
    else:
        sys.stdout.write(files.dump(document, as_yaml=True))


@workflows_app.command("validate")
@handled
def workflows_validate(path: Path, as_json: JsonOpt = False) -> None:
    """Check a workflow file offline with the engine's own validator (references to
    agents, credentials and other workflows are checked by the server on push)."""
    workflow = files.read(path)
    problems = files.check(workflow)
    if as_json:
        emit_json({"valid": not problems, "problems": problems})
        if problems:
            raise typer.Exit(Exit.USAGE)
        return
    if problems:
        raise Failure(
            Exit.USAGE,
            {
                "error": "validation_error",
                "detail": f"{path}: {len(problems)} problem(s)",
                "problems": problems,
            },
        )
    out.print(f"{escape(str(path))}: valid ({len(workflow.definition.get('nodes', []))} nodes)")


@workflows_app.command("push")
@handled
def workflows_push(
    path: Path,
    workflow_id: Annotated[
        str | None,
        typer.Option(
            "--id", help="Update this workflow (default: the file's own id, else create)."
        ),
    ] = None,
    publish: Annotated[bool, typer.Option(help="Publish it after saving.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create or update a workflow from a file. Saving an unchanged file makes no new
    version."""
    workflow = files.read(path)
    target = _uuid(workflow_id, "workflow") if workflow_id else workflow.workflow_id
    with Client(context()) as client:
        existing = None
        if target:
            try:
                existing = client.call("GET", f"/workflows/{target}")
            except Failure as failure:
                # A file pulled from another workspace or server: create it here.
                if failure.code != Exit.NOT_FOUND or workflow_id:
                    raise
        action = "created"
        if existing is None:
            if workflow.document is not None:
                document = {**workflow.document, "name": workflow.name}
                body = client.call(
                    "POST", "/workflows/import", json={"document": document}, needs_workspace=True
                )
            else:
                body = client.call("POST", "/workflows", json=workflow.body(), needs_workspace=True)
        else:
            wanted = workflow.body()
            same = all(existing.get(k) == v for k, v in wanted.items())
            if same:
                body, action = existing, "unchanged"
            else:
                body = client.call("PUT", f"/workflows/{existing['id']}", json=wanted)
                action = "updated"
        if publish and body["status"] != "published":
            body = client.call(
                "PATCH", f"/workflows/{body['id']}/status", json={"status": "published"}
            )
    if as_json:
        emit_json({"action": action, "workflow": body})
    else:
        out.print(
            f"{action} {escape(body['name'])} ({body['id']}), "
            f"version {body['version']}, {body['status']}"
        )


@workflows_app.command("publish")
@handled
def workflows_publish(workflow_id: str, as_json: JsonOpt = False) -> None:
    """Publish a draft (its triggers start firing)."""
    with Client(context()) as client:
        body = client.call(
            "PATCH",
            f"/workflows/{_uuid(workflow_id, 'workflow')}/status",
            json={"status": "published"},
        )
    if as_json:
        emit_json(body)
    else:
        out.print(f"published {escape(body['name'])} ({body['id']}), version {body['version']}")


# Runs ---------------------------------------------------------------------------------------


def _input(value: str | None) -> dict[str, Any]:
    if value is None:
        return {}
    source = "--input"
    if value.startswith("@"):
        path = Path(value[1:])
        source = str(path)
        try:
            value = sys.stdin.read() if value == "@-" else path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise fail(
                Exit.USAGE, "invalid_input", f"cannot read {path}: {exc}", field="input"
            ) from None
    try:
        data = json.loads(value)
    except ValueError as exc:
        raise fail(
            Exit.USAGE, "invalid_input", f"{source}: not JSON: {exc}", field="input"
        ) from None
    if not isinstance(data, dict):
        raise fail(Exit.USAGE, "invalid_input", f"{source}: must be a JSON object", field="input")
    return data


def _node_order(client: Client, execution: dict[str, Any]) -> list[str]:
    """The run's nodes in the order its workflow version lists them (shown pending
    before they start)."""
    try:
        version = client.call(
            "GET", f"/workflows/{execution['workflow_id']}/versions/{execution['version']}"
        )
    except Failure:
        return []
    return [n["id"] for n in version["definition"].get("nodes", []) if isinstance(n, dict)]


def _watch(
    client: Client,
    execution: dict[str, Any],
    *,
    follow_live: bool,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Follow (shown) or wait for (quiet) a run, then end with its status's exit code."""
    execution_id = str(execution["id"])
    view = choose_view(
        execution_id,
        as_json=as_json,
        quiet=not follow_live,
        node_order=_node_order(client, execution) if follow_live and not as_json else [],
    )

    def state() -> RunState:
        result: RunState = view.state
        return result

    try:
        status = follow(client, execution_id, view, state, timeout_s=timeout)
    except KeyboardInterrupt:
        err.print(
            f"\nStopped following; the run goes on. `studio executions cancel {execution_id}` "
            "stops it."
        )
        raise typer.Exit(130) from None
    if status is None:
        raise fail(
            Exit.TIMEOUT,
            "timeout",
            f"run {execution_id} had not ended after {timeout} s (it goes on)",
            execution_id=execution_id,
        )
    if not follow_live:
        final = client.call("GET", f"/executions/{execution_id}")
        if as_json:
            emit_json(final)
        else:
            _print_execution(final)
    raise typer.Exit(int(RUN_EXIT.get(status, Exit.RUN_FAILED)))


@app.command("run")
@handled
def run_workflow(
    workflow_id: str,
    input_: Annotated[
        str | None,
        typer.Option(
            "--input", "-i", help="The run's input: a JSON object, or @file (@- for stdin)."
        ),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the run to end; print it.")
    ] = False,
    follow_: Annotated[
        bool, typer.Option("--follow", "-f", help="Show the run live until it ends.")
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option(min=0.1, help="With --wait/--follow: give up after this many seconds."),
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Starting again with the same key starts no second run.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a run of a workflow. With --wait or --follow, the exit code is the run's:
    0 completed, 1 failed, 3 cancelled (8 if --timeout came first)."""
    body = {"workflow_id": _uuid(workflow_id, "workflow"), "trigger_data": _input(input_)}
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    with Client(context()) as client:
        accepted = client.call("POST", "/executions", json=body, headers=headers)
        if not (wait or follow_):
            if as_json:
                emit_json(accepted)
            else:
                out.print(f"started run {accepted['id']} ({accepted['status']})")
                err.print(f"[dim]studio executions show {accepted['id']} --follow[/]")
            return
        if not as_json and follow_:
            err.print(f"[dim]run {accepted['id']}[/]")
        _watch(client, accepted, follow_live=follow_, timeout=timeout, as_json=as_json)


def _print_execution(body: dict[str, Any]) -> None:
    out.print(f"run [bold]{body['id']}[/] {body['status']}")
    out.print(
        f"workflow {body['workflow_id']} v{body['version']}, {body['trigger_type']}, "
        f"created {short_time(body['created_at'])}, {duration(body['duration_ms']) or '-'}"
    )
    used = tokens(body.get("input_tokens"), body.get("output_tokens"))
    if used:
        out.print(f"tokens {used}, cost {cost(body.get('cost_usd'))}")
    if body.get("error"):
        out.print(f"[red]error[/]: {escape(json.dumps(body['error']))}")
    if body.get("output") is not None:
        out.print(f"output: {escape(json.dumps(body['output'])[:2000])}")
    if body.get("nodes"):
        table(
            ["node", "status", "attempt", "duration"],
            [
                [n["node_id"], n["status"], n["attempt"], duration(n["duration_ms"])]
                for n in body["nodes"]
            ],
        )


@executions_app.command("list")
@handled
def executions_list(
    workflow: Annotated[str | None, typer.Option(help="Only this workflow's runs.")] = None,
    status: Annotated[
        str | None, typer.Option(help="pending, running, completed, failed or cancelled.")
    ] = None,
    limit: Limit = 20,
    offset: Offset = 0,
    as_json: JsonOpt = False,
) -> None:
    """Runs, newest first."""
    params = {
        "workflow_id": _uuid(workflow, "workflow") if workflow else None,
        "status": status,
        "limit": limit,
        "offset": offset,
    }
    with Client(context()) as client:
        page = client.call("GET", "/executions", params=params, needs_workspace=True)
    if as_json:
        emit_json(page)
        return
    table(
        ["id", "workflow", "status", "created", "duration", "tokens"],
        [
            [
                e["id"],
                e["workflow_id"],
                e["status"],
                short_time(e["created_at"]),
                duration(e["duration_ms"]),
                tokens(e["input_tokens"], e["output_tokens"]),
            ]
            for e in page["items"]
        ],
    )


@executions_app.command("show")
@handled
def executions_show(
    execution_id: str,
    follow_: Annotated[
        bool, typer.Option("--follow", "-f", help="Show it live until it ends.")
    ] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for it to end.")] = False,
    timeout: Annotated[float | None, typer.Option(min=0.1)] = None,
    as_json: JsonOpt = False,
) -> None:
    """A run: status, timing, tokens and cost, output or error, every node. With
    --follow/--wait, the exit code is the run's."""
    with Client(context()) as client:
        body = client.call("GET", f"/executions/{_uuid(execution_id, 'execution')}")
        if follow_ or wait:
            _watch(client, body, follow_live=follow_, timeout=timeout, as_json=as_json)
    if as_json:
        emit_json(body)
    else:
        _print_execution(body)


@executions_app.command("logs")
@handled
def executions_logs(execution_id: str, as_json: JsonOpt = False) -> None:
    """What happened in a run, line by line."""
    with Client(context()) as client:
        entries = client.call("GET", f"/executions/{_uuid(execution_id, 'execution')}/logs")
    if as_json:
        emit_json(entries)
        return
    style = {"warning": "yellow", "error": "red"}  # info: "none", the plain style
    for entry in entries:
        level = entry["level"]
        node = f" {escape(entry['node_id'])}" if entry.get("node_id") else ""
        out.print(
            f"{short_time(entry.get('at'))} [{style.get(level, 'none')}]{level:7}[/]{node} "
            f"{escape(entry['message'])}"
        )


@executions_app.command("cancel")
@handled
def executions_cancel(execution_id: str, as_json: JsonOpt = False) -> None:
    """Stop a run (within about a second); its sub-runs stop too."""
    with Client(context()) as client:
        body = client.call("POST", f"/executions/{_uuid(execution_id, 'execution')}/cancel")
    if as_json:
        emit_json(body)
    else:
        out.print(f"run {body['id']}: {body['status']} (cancel requested)")


@executions_app.command("retry")
@handled
def executions_retry(
    execution_id: str,
    wait: Annotated[bool, typer.Option("--wait")] = False,
    follow_: Annotated[bool, typer.Option("--follow", "-f")] = False,
    timeout: Annotated[float | None, typer.Option(min=0.1)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a failed or cancelled run again from where it stopped (its completed nodes
    are not run again)."""
    with Client(context()) as client:
        accepted = client.call("POST", f"/executions/{_uuid(execution_id, 'execution')}/retry")
        if wait or follow_:
            _watch(client, accepted, follow_live=follow_, timeout=timeout, as_json=as_json)
    if as_json:
        emit_json(accepted)
    else:
        out.print(f"retrying as run {accepted['id']} ({accepted['status']})")


# Admin --------------------------------------------------------------------------------------


@tasks_app.command("list")
@handled
def tasks_list(
    status: Annotated[
        str | None, typer.Option(help="open, approved, rejected, expired or cancelled.")
    ] = "open",
    mine: Annotated[bool, typer.Option("--mine", help="Only tasks you may decide.")] = False,
    workflow: Annotated[str | None, typer.Option(help="Only this workflow's tasks.")] = None,
    limit: Limit = 20,
    offset: Offset = 0,
    as_json: JsonOpt = False,
) -> None:
    """The inbox, newest first (open ones by default; --status '' for all)."""
    params = {
        "status": status or None,
        "assigned_to": "me" if mine else None,
        "workflow_id": _uuid(workflow, "workflow") if workflow else None,
        "limit": limit,
        "offset": offset,
    }
    with Client(context()) as client:
        page = client.call("GET", "/tasks", params=params, needs_workspace=True)
    if as_json:
        emit_json(page)
        return
    table(
        ["id", "status", "title", "run", "node", "yours", "expires"],
        [
            [
                t["id"],
                t["status"],
                t["title"],
                t["execution_id"] or "",
                t["node_id"] or "",
                "yes" if t["can_decide"] else "",
                short_time(t["expires_at"]) if t["expires_at"] else "",
            ]
            for t in page["items"]
        ],
    )


def _decide(task_id: str, action: str, comment: str | None, value: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"comment": comment}
    if value is not None:
        body["input"] = _input(value)
    with Client(context()) as client:
        result: dict[str, Any] = client.call(
            "POST", f"/tasks/{_uuid(task_id, 'task')}/{action}", json=body
        )
    return result


InputOpt = Annotated[
    str | None,
    typer.Option("--input", help="The form's input: JSON, or @file.json (@- for stdin)."),
]
CommentOpt = Annotated[str | None, typer.Option("--comment", "-m", help="Why.")]


@tasks_app.command("approve")
@handled
def tasks_approve(
    task_id: str, comment: CommentOpt = None, value: InputOpt = None, as_json: JsonOpt = False
) -> None:
    """Approve a task (once: a task already decided exits with a conflict)."""
    body = _decide(task_id, "approve", comment, value)
    if as_json:
        emit_json(body)
    else:
        out.print(f"task {body['id']}: {body['status']}")


@tasks_app.command("reject")
@handled
def tasks_reject(
    task_id: str, comment: CommentOpt = None, value: InputOpt = None, as_json: JsonOpt = False
) -> None:
    """Reject a task."""
    body = _decide(task_id, "reject", comment, value)
    if as_json:
        emit_json(body)
    else:
        out.print(f"task {body['id']}: {body['status']}")


@admin_app.command("create-api-key")
@handled
def admin_create_api_key(
    workspace: Annotated[
        str | None,
        typer.Option(help="The workspace id (default: the only one there is, or --email's)."),
    ] = None,
    email: Annotated[
        str | None,
        typer.Option(help="The member the key acts for; created with a workspace if new."),
    ] = None,
    role: Annotated[str, typer.Option(help="viewer, editor, administrator or owner.")] = "editor",
    name: Annotated[str, typer.Option(help="A name to recognise the key by.")] = "cli",
    expires_in_days: Annotated[int | None, typer.Option(min=1, max=3650)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a new API key for scripts and CI, straight from the database (DATABASE_URL):
    no mailbox needed. With no user at all, creates the first one (admin@example.com,
    or --email) and their workspace."""
    from studio.admin import create_key

    workspace_id = uuid.UUID(_uuid(workspace, "workspace")) if workspace else None
    try:
        created = create_key(
            workspace_id=workspace_id,
            email=email,
            role=role,
            name=name,
            expires_in_days=expires_in_days,
        )
    except OSError as exc:
        raise fail(Exit.UNAVAILABLE, "database_unavailable", str(exc)) from None
    except Exception as exc:
        if type(exc).__module__.startswith("sqlalchemy"):
            raise fail(
                Exit.UNAVAILABLE,
                "database_unavailable",
                f"cannot use the database: {str(exc).splitlines()[0]}",
                hint="run it where DATABASE_URL reaches PostgreSQL (`make api-key` does)",
            ) from None
        raise
    if as_json:
        emit_json(created.as_dict())
        return
    if created.created_user:
        err.print(f"Created user {escape(created.created_by)} and their workspace.")
    err.print(
        f"API key {escape(created.name)} ({created.role}) for workspace "
        f"{escape(created.workspace_name)} ({created.workspace_id}); shown once:"
    )
    # The key alone on stdout: KEY=$(studio admin create-api-key) works.
    sys.stdout.write(created.key + "\n")
    err.print("[dim]Use it: export STUDIO_API_KEY=<key>, or `studio login --api-key`.[/]")


def run() -> None:
    app()
