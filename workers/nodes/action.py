"""Action nodes: HTTP requests through the SSRF guard, with credentials injected at
send time (never part of the node's recorded input or output)."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx

from backend.kit.http_guard import BlockedAddress, ResponseTooLarge, TooManyRedirects, fetch
from backend.workflows.graph import (
    DatabaseAction,
    FileReadAction,
    FileWriteAction,
    HttpRequestAction,
    N8nAction,
    NotifyAction,
)
from workers.engine.retry import NodeFailure, classify_status
from workers.nodes import database, files, n8n, notify
from workers.nodes.base import NodeContext, NodeResult, outbound_request


async def _credential_headers(ctx: NodeContext, credential_id: Any) -> dict[str, str]:
    secret = await ctx.secret(credential_id)
    kind = secret.get("type")
    if kind == "bearer":
        return {"Authorization": f"Bearer {secret['token']}"}
    if kind == "api_key":
        return {secret.get("header") or "X-API-Key": secret["key"]}
    if kind == "basic":
        pair = f"{secret['username']}:{secret['password']}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
    if kind == "headers":
        return {str(k): str(v) for k, v in secret["headers"].items()}
    raise NodeFailure(f"credential type {kind!r} cannot be used for HTTP", "permanent")


def _body(response: httpx.Response, raw: bytes) -> Any:
    text = raw.decode(response.encoding or "utf-8", errors="replace")
    if "json" in response.headers.get("content-type", ""):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


async def http_request(ctx: NodeContext, config: HttpRequestAction) -> NodeResult:
    url = ctx.render(config.url)
    headers, params, content = outbound_request(ctx, config.headers, config.query, config.body)
    secret_headers: set[str] = set()
    if config.credential_id is not None:
        injected = await _credential_headers(ctx, config.credential_id)
        secret_headers = {name.lower() for name in injected}
        headers.update(injected)
    try:
        request = ctx.http.build_request(
            config.method,
            url,
            headers=headers,
            # An empty dict would replace the query string the URL already carries.
            params=params or None,
            content=content,
            timeout=config.timeout_s,
        )
        response, raw = await fetch(
            ctx.http,
            request,
            max_redirects=ctx.settings.http.max_redirects,
            secret_headers=secret_headers,
            # Never read more than a node may output: a 100 MB body is refused early.
            max_bytes=min(config.max_response_bytes, ctx.settings.engine.max_output_bytes),
        )
    except BlockedAddress as exc:
        raise NodeFailure(str(exc), "permanent") from exc
    except (ResponseTooLarge, TooManyRedirects) as exc:
        raise NodeFailure(str(exc), "permanent") from exc
    except httpx.InvalidURL as exc:
        raise NodeFailure(f"invalid URL: {exc}", "permanent") from exc
    # Host and path only: query strings and headers may carry secrets.
    ctx.log(
        f"{config.method} {request.url.host}{request.url.path} -> {response.status_code}",
        status=response.status_code,
        bytes=len(raw),
    )
    output = {
        "status": response.status_code,
        "headers": dict(response.headers),
        "body": _body(response, raw),
    }
    if response.status_code >= 400:
        retry_after = response.headers.get("retry-after")
        raise NodeFailure(
            f"HTTP {response.status_code} from {request.url.host}",
            classify_status(response.status_code, raw[:2000].decode(errors="replace")),
            float(retry_after) if retry_after and retry_after.isdigit() else None,
        )
    return NodeResult(output=output)


async def run(ctx: NodeContext) -> NodeResult:
    if isinstance(ctx.config, HttpRequestAction):
        return await http_request(ctx, ctx.config)
    if isinstance(ctx.config, FileReadAction):
        return await files.file_read(ctx, ctx.config)
    if isinstance(ctx.config, FileWriteAction):
        return await files.file_write(ctx, ctx.config)
    if isinstance(ctx.config, NotifyAction):
        return await notify.run(ctx, ctx.config)
    if isinstance(ctx.config, DatabaseAction):
        return await database.run(ctx, ctx.config)
    if isinstance(ctx.config, N8nAction):
        return await n8n.run(ctx, ctx.config)
    raise NodeFailure(
        f"action kind {ctx.config.kind!r} is not supported by this engine yet", "permanent"
    )
