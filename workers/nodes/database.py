"""The `database` action: one parameterised SQL statement against the PostgreSQL
database a `postgres` credential names.

- Values are bind parameters (`%(name)s`), sent apart from the SQL; the statement is
  prepared (extended protocol), which also means one statement per node: `select 1;
  drop table t` is refused by the server, never run.
- Read-only by default: the transaction starts with SET TRANSACTION READ ONLY unless the
  node says `write: true`.
- Bounded: DBNODE__CONNECT_TIMEOUT_S, a statement_timeout (the node's `timeout_s` or
  DBNODE__STATEMENT_TIMEOUT_S, whichever is shorter) and at most `max_rows`
  (DBNODE__MAX_ROWS) rows read; more are reported as `truncated`.
- The host goes through the SSRF rules: resolved here, refused if private, loopback,
  link-local or metadata (unless HTTP__ALLOW_PRIVATE_NETWORKS opens it), and connected
  to by the checked address (`hostaddr`), so DNS cannot change the answer in between.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from typing import Any

import psycopg
from psycopg.rows import dict_row

from backend.kit.http_guard import _allowed
from backend.workflows.graph import DatabaseAction
from workers.engine.retry import NodeFailure
from workers.nodes.base import NodeContext, NodeResult

# SQLSTATE classes worth another attempt: connection exceptions, insufficient resources,
# operator intervention (admin shutdown), serialization failures and deadlocks.
TRANSIENT_STATES = ("08", "53", "57P", "40001", "40P01")


async def checked_address(host: str, port: int, allow: list[str]) -> str:
    networks = [ipaddress.ip_network(c, strict=False) for c in allow]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise NodeFailure(f"database host {host} does not resolve: {exc}", "connection") from None
    addresses = []
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if not _allowed(ip, networks):
            raise NodeFailure(
                f"database host {host} resolves to {ip}, which outbound connections may not "
                "reach (HTTP__ALLOW_PRIVATE_NETWORKS)",
                "permanent",
            )
        addresses.append(str(ip))
    if not addresses:
        raise NodeFailure(f"database host {host} does not resolve", "permanent")
    return addresses[0]


def _jsonable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Decimal, dates, UUIDs, bytes...: as text, the way a person reads them.
    result: list[dict[str, Any]] = json.loads(json.dumps(rows, default=str))
    return result


def _failure(exc: psycopg.Error) -> NodeFailure:
    state = getattr(exc, "sqlstate", None) or ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return NodeFailure(f"the statement ran out of time: {message}", "timeout")
    if isinstance(exc, psycopg.OperationalError) and not state:
        return NodeFailure(f"could not reach the database: {message}", "connection")
    if state.startswith(TRANSIENT_STATES):
        return NodeFailure(f"database error {state}: {message}", "connection")
    return NodeFailure(
        f"database error {state}: {message}".replace("error : ", "error: "), "permanent"
    )


async def run(ctx: NodeContext, config: DatabaseAction) -> NodeResult:
    secret = await ctx.secret(config.credential_id)
    if secret.get("type") != "postgres":
        raise NodeFailure(
            f"credential type {secret.get('type')!r} is not a postgres credential", "permanent"
        )
    limits = ctx.settings.dbnode
    max_rows = min(config.max_rows or limits.max_rows, limits.max_rows)
    timeout_s = min(config.timeout_s or limits.statement_timeout_s, limits.statement_timeout_s)
    parameters = {name: ctx.render_json(source) for name, source in config.parameters.items()}
    host, port = str(secret["host"]), int(secret.get("port") or 5432)
    address = await checked_address(host, port, ctx.settings.http.allow_private_networks)
    try:
        async with asyncio.timeout(limits.connect_timeout_s + timeout_s + 5):
            conn = await psycopg.AsyncConnection.connect(
                host=host,
                hostaddr=address,
                port=port,
                dbname=secret["database"],
                user=secret["user"],
                password=secret.get("password") or None,
                sslmode=secret.get("sslmode") or "prefer",
                connect_timeout=max(1, int(limits.connect_timeout_s)),
                application_name="orchestration-studio-node",
                options=f"-c statement_timeout={int(timeout_s * 1000)}",
                row_factory=dict_row,
            )
            async with conn:
                async with conn.cursor() as cur:
                    if not config.write:
                        # The first statement of the transaction: nothing after it writes.
                        await cur.execute("SET TRANSACTION READ ONLY")
                    # Prepared: the extended protocol, which runs exactly one statement
                    # (with no parameters psycopg would otherwise send a simple query,
                    # and `select 1; drop table t` would run both).
                    await cur.execute(config.query, parameters, prepare=True)
                    columns = [d.name for d in cur.description] if cur.description else []
                    rows = await cur.fetchmany(max_rows + 1) if cur.description else []
                    affected = cur.rowcount
                await conn.commit()
    except TimeoutError:
        raise NodeFailure("the database did not answer in time", "timeout") from None
    except psycopg.Error as exc:
        raise _failure(exc) from None
    truncated = len(rows) > max_rows
    rows = rows[:max_rows]
    ctx.log(
        f"SQL on {host}/{secret['database']}: {len(rows)} rows",
        rows=len(rows),
        truncated=truncated,
    )
    return NodeResult(
        output={
            "columns": columns,
            "rows": _jsonable(rows),
            "row_count": len(rows),
            "affected": affected if not columns else None,
            "truncated": truncated,
        }
    )
