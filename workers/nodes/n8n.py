"""The `n8n` action node: drive a workflow on one of the workspace's n8n instances.

`webhook`: read the workflow through the instance's public API (its key, backend/n8n/
client.py), find its Webhook node, and call the production webhook
(`<base>/webhook/<path>`) with the node's method, rendered headers, query and body. The
webhook call uses the client's guarded HTTP client (SSRF guard, no redirects, size cap)
but never the API key: a webhook's headers are visible in n8n's execution data.
`retry_execution`: `POST /executions/{id}/retry` through the client.

n8n 2.41's public API has no route that starts a workflow (only the evaluation
test-runs), so a webhook is how another system runs one. The instance is looked up in the
run's own workspace only: a definition naming another workspace's instance fails here
too, not only at save. A call that may have reached n8n (a timeout, a 500 after the body
was sent) is not sent again by the engine's retries: it could run the n8n workflow twice.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import httpx
from sqlalchemy import select

from backend.kit.http_guard import BlockedAddress, ResponseTooLarge
from backend.models import N8nInstance
from backend.n8n import client as n8n
from backend.n8n.service import client_of
from backend.workflows.graph import N8nAction
from workers.engine.retry import NodeFailure, classify_status
from workers.nodes.base import NodeContext, NodeResult, outbound_request

WEBHOOK_TYPE = "n8n-nodes-base.webhook"
# Answers that say the call was not carried out: safe to send again.
NOT_CARRIED_OUT = frozenset({429, 503})


async def _instance(ctx: NodeContext, config: N8nAction) -> N8nInstance:
    async with ctx.sessionmaker() as session:
        instance = await session.scalar(
            select(N8nInstance).where(
                N8nInstance.id == config.instance_id,
                N8nInstance.workspace_id == ctx.workspace_id,
            )
        )
    if instance is None:
        raise NodeFailure("n8n instance not found in this workspace", "permanent")
    if not instance.enabled:
        raise NodeFailure(f"n8n instance {instance.name!r} is disabled", "permanent")
    return instance


def _failure(exc: n8n.N8nFailure, sent: bool) -> NodeFailure:
    """The client's failure as the engine sees it: transient only when nothing reached
    n8n (could not connect, 429/503) or when asking again changes nothing (a read)."""
    cause = exc.__cause__
    if isinstance(cause, BlockedAddress):
        return NodeFailure(exc.message, "permanent")
    if isinstance(cause, httpx.ConnectError | httpx.ConnectTimeout):
        return NodeFailure(exc.message, "connection")
    if exc.status == 429:
        return NodeFailure(exc.message, "rate_limited")
    if exc.status == 503 or (not sent and exc.status is not None and exc.status >= 500):
        return NodeFailure(exc.message, "server_error")
    if not sent and isinstance(exc, n8n.Unreachable):
        return NodeFailure(exc.message, "connection")
    return NodeFailure(exc.message, "permanent")


def webhook_node(workflow: dict[str, Any], path: str | None) -> dict[str, Any]:
    """The Webhook node to call: the one with `path`, or the only one."""
    nodes = [
        n
        for n in workflow.get("nodes") or []
        if isinstance(n, dict) and n.get("type") == WEBHOOK_TYPE and not n.get("disabled")
    ]
    name = workflow.get("name") or workflow.get("id")
    if path is not None:
        nodes = [n for n in nodes if _path_of(n) == path.strip("/")]
        if not nodes:
            raise NodeFailure(
                f"n8n workflow {name!r} has no Webhook node on path {path!r}", "permanent"
            )
    if not nodes:
        raise NodeFailure(f"n8n workflow {name!r} has no (enabled) Webhook node", "permanent")
    if len(nodes) > 1:
        raise NodeFailure(
            f"n8n workflow {name!r} has {len(nodes)} Webhook nodes: set webhook_path", "permanent"
        )
    return nodes[0]


def _path_of(node: dict[str, Any]) -> str:
    params = node.get("parameters") if isinstance(node.get("parameters"), dict) else {}
    path = str((params or {}).get("path") or node.get("webhookId") or "").strip("/")
    return path


def _decoded(response: httpx.Response, raw: bytes) -> Any:
    text = raw.decode(response.encoding or "utf-8", errors="replace")
    if "json" in response.headers.get("content-type", ""):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


async def _call_webhook(
    ctx: NodeContext, config: N8nAction, api: n8n.N8nClient, node: dict[str, Any]
) -> NodeResult:
    path = _path_of(node)
    if not path or ":" in path:
        raise NodeFailure(
            f"the Webhook node {node.get('name')!r} has a dynamic or empty path; "
            "call it with an http_request node",
            "permanent",
        )
    params = node.get("parameters") if isinstance(node.get("parameters"), dict) else {}
    method = config.method or str((params or {}).get("httpMethod") or "GET").upper()
    url = f"{api.root}/webhook/{quote(path, safe='/-_.~')}"
    # As an http_request node sends it (templates, JSON body, the Idempotency-Key an n8n
    # workflow can dedupe on: the engine delivers at least once).
    headers, query, content = outbound_request(ctx, config.headers, config.query, config.body)
    limit = min(config.max_response_bytes, ctx.settings.engine.max_output_bytes)
    try:
        request = api.http.build_request(
            method, url, headers=headers, params=query or None, content=content,
            timeout=config.timeout_s,
        )  # fmt: skip
        response = await api.http.send(request, stream=True)
        raw = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                raw.extend(chunk)
                if len(raw) > limit:
                    raise ResponseTooLarge(f"the webhook answered more than {limit} bytes")
        finally:
            await response.aclose()
    except BlockedAddress as exc:
        raise NodeFailure(f"{exc}; an operator can allow it in HTTP__ALLOW_PRIVATE_NETWORKS",
                          "permanent") from exc  # fmt: skip
    except ResponseTooLarge as exc:
        raise NodeFailure(str(exc), "permanent") from exc
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise NodeFailure(f"cannot connect to {api.root}: {exc}", "connection") from exc
    except httpx.TimeoutException as exc:
        # The request may have started the workflow: not sent again.
        raise NodeFailure(
            f"the n8n webhook did not answer within {config.timeout_s:g} s", "permanent"
        ) from exc
    except httpx.HTTPError as exc:
        raise NodeFailure(f"n8n webhook call failed: {exc}", "permanent") from exc
    ctx.log(f"{method} {request.url.host}/webhook/… -> {response.status_code}",
            status=response.status_code, bytes=len(raw))  # fmt: skip
    status = response.status_code
    output = {
        "operation": "webhook",
        "n8n_workflow_id": config.n8n_workflow_id,
        "webhook_node": node.get("name"),
        "method": method,
        "status": status,
        "headers": dict(response.headers),
        "body": _decoded(response, bytes(raw)),
    }
    if 300 <= status < 400:
        raise NodeFailure(f"the n8n webhook answered {status} (redirects are not followed)",
                          "permanent")  # fmt: skip
    if status == 404:
        raise NodeFailure(
            f"the n8n webhook {path!r} answered 404: is the workflow published, and is "
            f"{method} the Webhook node's method?",
            "permanent",
        )
    if status >= 400:
        kind = (
            classify_status(status, raw[:2000].decode(errors="replace"))
            if method in ("GET", "HEAD") or status in NOT_CARRIED_OUT
            else "permanent"
        )
        retry_after = response.headers.get("retry-after")
        raise NodeFailure(
            f"the n8n webhook answered {status}",
            kind,
            float(retry_after) if retry_after and retry_after.isdigit() else None,
        )
    return NodeResult(output=output)


async def run(ctx: NodeContext, config: N8nAction) -> NodeResult:
    instance = await _instance(ctx, config)
    api = client_of(ctx.settings, instance)
    async with api:
        if config.operation == "retry_execution":
            execution_id = ctx.render(config.execution_id or "").strip()
            try:
                answer = await api.retry_execution(execution_id, load_workflow=config.load_workflow)
            except n8n.N8nFailure as exc:
                raise _failure(exc, sent=True) from exc
            ctx.log(f"retried n8n execution {execution_id} -> {answer.get('id')}")
            data = dict(answer)
            return NodeResult(
                output={
                    "operation": "retry_execution",
                    "retry_of": execution_id,
                    "execution": {k: data.get(k) for k in (
                        "id", "status", "finished", "mode", "workflowId", "retryOf",
                        "startedAt", "stoppedAt")},
                }
            )  # fmt: skip
        assert config.n8n_workflow_id is not None
        try:
            workflow = dict(await api.workflow(config.n8n_workflow_id))
        except n8n.N8nFailure as exc:
            raise _failure(exc, sent=False) from exc
        if not workflow.get("active"):
            raise NodeFailure(
                f"n8n workflow {workflow.get('name')!r} is not active: its production "
                "webhook answers only once it is published",
                "permanent",
            )
        node = webhook_node(workflow, config.webhook_path)
        return await _call_webhook(ctx, config, api, node)
