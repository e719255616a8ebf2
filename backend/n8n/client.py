"""The one client for an n8n instance's public REST API v1 (`{base}/api/v1`).

Every call goes through the SSRF guard (an instance on a private network needs an
operator's HTTP__ALLOW_PRIVATE_NETWORKS entry, as HTTP nodes do), sends the key in
`X-N8N-API-KEY`, never follows a redirect (a key must not travel to another address),
reads at most N8N__MAX_RESPONSE_BYTES, and retries 429 and 5xx answers and connection
failures with exponential backoff (honouring Retry-After). A POST that may have reached
n8n is not sent again after a timeout or a 500: retrying an execution twice would run it
twice. Lists follow `nextCursor` to the end (or to a page cap).

Publishing: n8n 2.x has `POST /workflows/{id}/publish` and `/unpublish` (`/activate`
and `/deactivate` stay as deprecated aliases); 1.x has only the latter. The client uses
publish/unpublish and falls back to activate/deactivate once a 404 shows the route is
not there, remembering that for the instance's later calls.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Self, cast

import httpx

from backend.config import Settings
from backend.kit.http_guard import BlockedAddress, ResponseTooLarge, guarded_client
from backend.n8n.api_types import (
    Credential,
    CredentialList,
    Execution,
    ExecutionList,
    RetryBody,
    Tag,
    Workflow,
    WorkflowCreate,
    WorkflowList,
)

API_PATH = "/api/v1"
# What an X-N8N-API-KEY header may carry (as backend/n8n/schemas.py accepts keys).
_HEADER_SAFE = re.compile(r"^[\x21-\x7e]+$")
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# A POST answered with these was not carried out: safe to send again.
POST_RETRY_STATUSES = frozenset({429, 503})
MAX_RETRY_AFTER_S = 30.0


class N8nFailure(Exception):
    """A call to an instance that did not succeed. `kind` is what the instance's status
    becomes: unreachable | unauthorized | forbidden | not_found | rejected | error."""

    kind = "error"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class Unreachable(N8nFailure):
    kind = "unreachable"


class Unauthorized(N8nFailure):
    kind = "unauthorized"


class Forbidden(N8nFailure):
    kind = "forbidden"


class Missing(N8nFailure):
    kind = "not_found"


class Rejected(N8nFailure):
    """n8n refused the request itself (400, 409, 415, 422): sending it again won't help."""

    kind = "rejected"


def api_root(base_url: str) -> str:
    """The instance's API root: the base URL without a trailing slash or /api/v1."""
    root = base_url.strip().rstrip("/")
    if root.endswith(API_PATH):
        root = root[: -len(API_PATH)]
    return root


def _message(response: httpx.Response, body: bytes) -> str:
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("message"), str):
        return str(payload["message"])[:500]
    text = body.decode("utf-8", "replace").strip()
    return (text[:200] or response.reason_phrase or "no message").replace("\n", " ")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max((when - datetime.now(UTC)).total_seconds(), 0.0), MAX_RETRY_AFTER_S)


@dataclass
class Probe:
    """What `POST /n8n/instances/{id}/test` reports."""

    version: str | None
    # 1 or 2 when known (from the version, or from which publish route answers).
    major: int | None
    # Read scopes the key was seen to hold, and the ones it was refused.
    capabilities: dict[str, bool] = field(default_factory=dict)


class N8nClient:
    def __init__(
        self,
        settings: Settings,
        base_url: str,
        api_key: str,
        *,
        http: httpx.AsyncClient | None = None,
        legacy_publish: bool | None = None,
    ) -> None:
        self.settings = settings
        self.conf = settings.n8n
        self.root = api_root(base_url)
        self._key = api_key
        self._own_http = http is None
        self.http = http or guarded_client(
            settings.http.allow_private_networks,
            timeout=self.conf.request_timeout_s,
            user_agent=settings.http.user_agent,
        )
        # None: not known yet; True: a 1.x instance (activate/deactivate only).
        self.legacy_publish = legacy_publish

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_http:
            await self.http.aclose()

    # The wire --------------------------------------------------------------------------

    async def _send_once(
        self, method: str, url: str, params: dict[str, Any] | None, body: Any
    ) -> tuple[httpx.Response, bytes]:
        if not _HEADER_SAFE.match(self._key):
            # A key stored before the API refused such keys: the HTTP client would fail
            # on it with the key itself in the error (a 500, the key in logs and Flower).
            raise Unauthorized(
                "the stored API key is not one n8n issues (printable ASCII, no spaces);"
                " set it again"
            )
        request = self.http.build_request(
            method,
            url,
            params={k: v for k, v in (params or {}).items() if v is not None},
            json=body,
            headers={"X-N8N-API-KEY": self._key, "Accept": "application/json"},
            timeout=self.conf.request_timeout_s,
        )
        response = await self.http.send(request, stream=True)
        data = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                data.extend(chunk)
                if len(data) > self.conf.max_response_bytes:
                    raise ResponseTooLarge(
                        f"n8n answered more than {self.conf.max_response_bytes} bytes"
                    )
        finally:
            await response.aclose()
        return response, bytes(data)

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: Any = None,
        api: bool = True,
    ) -> Any:
        """One call, with retries; the decoded JSON answer (None when empty)."""
        url = self.root + (API_PATH if api else "") + path
        idempotent = method in ("GET", "HEAD", "PUT", "DELETE")
        attempts = self.conf.retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response, data = await self._send_once(method, url, params, body)
            except BlockedAddress as exc:
                raise Unreachable(
                    f"{exc}; an operator can allow it in HTTP__ALLOW_PRIVATE_NETWORKS"
                ) from exc
            except ResponseTooLarge as exc:
                raise N8nFailure(str(exc)) from exc
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # Nothing was sent: any method may try again.
                if last:
                    raise Unreachable(
                        f"cannot connect to {self.root}: {exc or type(exc).__name__}"
                    ) from exc
                await self._pause(attempt, None)
                continue
            except httpx.TimeoutException as exc:
                if last or not idempotent:
                    raise Unreachable(
                        f"{self.root} did not answer within {self.conf.request_timeout_s:g} s"
                    ) from exc
                await self._pause(attempt, None)
                continue
            except httpx.HTTPError as exc:
                if last or not idempotent:
                    raise Unreachable(f"{self.root}: {exc or type(exc).__name__}") from exc
                await self._pause(attempt, None)
                continue
            status = response.status_code
            retryable = status in (RETRY_STATUSES if idempotent else POST_RETRY_STATUSES)
            if retryable and not last:
                await self._pause(attempt, _retry_after(response))
                continue
            return self._decode(response, data, method, path)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _pause(self, attempt: int, retry_after: float | None) -> None:
        delay = retry_after if retry_after is not None else self.conf.backoff_s * (2**attempt)
        await asyncio.sleep(delay)

    def _decode(self, response: httpx.Response, data: bytes, method: str, path: str) -> Any:
        status = response.status_code
        if 300 <= status < 400:
            where = response.headers.get("location", "?")
            raise Rejected(
                f"n8n answered {status} redirecting to {where}: set the instance's base URL "
                "to where n8n answers (the key is never sent to a redirect)",
                status=status,
            )
        if status == 401:
            raise Unauthorized(
                f"n8n refused the API key ({_message(response, data)})", status=status
            )
        if status == 403:
            raise Forbidden(
                f"n8n forbids {method} {path} for this key ({_message(response, data)})",
                status=status,
            )
        if status == 404:
            raise Missing(f"n8n: {method} {path}: {_message(response, data)}", status=status)
        if 400 <= status < 500:
            raise Rejected(
                f"n8n refused {method} {path}: {_message(response, data)}", status=status
            )
        if status >= 500:
            raise N8nFailure(
                f"n8n answered {status} to {method} {path}: {_message(response, data)}",
                status=status,
            )
        if not data.strip():
            return None
        try:
            return json.loads(data)
        except ValueError as exc:
            raise N8nFailure(
                f"n8n's answer to {method} {path} is not JSON; is {self.root} an n8n instance?",
                status=status,
            ) from exc

    async def _object(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        value = await self.request(method, path, **kwargs)
        if not isinstance(value, dict):
            raise N8nFailure(f"n8n's answer to {method} {path} is not a JSON object")
        return value

    async def pages(
        self, path: str, params: dict[str, Any], *, max_pages: int | None = None
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Each page's `data`, following `nextCursor` until it is null (or max_pages)."""
        cursor: str | None = None
        count = 0
        while True:
            page = await self._object(
                "GET", path, params={**params, "limit": self.conf.page_size, "cursor": cursor}
            )
            data = page.get("data")
            if not isinstance(data, list):
                raise N8nFailure(f"n8n's answer to GET {path} has no `data` list")
            yield [item for item in data if isinstance(item, dict)]
            count += 1
            cursor = page.get("nextCursor") or None
            if cursor is None or (max_pages is not None and count >= max_pages):
                return

    # Workflows -------------------------------------------------------------------------

    async def workflows(self, *, active: bool | None = None) -> list[Workflow]:
        params: dict[str, Any] = {"excludePinnedData": "true"}
        if active is not None:
            params["active"] = "true" if active else "false"
        out: list[Workflow] = []
        async for page in self.pages("/workflows", params):
            out += cast(WorkflowList, {"data": page})["data"]
        return out

    async def workflow(self, workflow_id: str) -> Workflow:
        path = f"/workflows/{_segment(workflow_id)}"
        return cast(Workflow, await self._object("GET", path, params={"excludePinnedData": "true"}))

    async def create_workflow(self, body: WorkflowCreate) -> Workflow:
        return cast(Workflow, await self._object("POST", "/workflows", body=dict(body)))

    async def update_workflow(self, workflow_id: str, body: WorkflowCreate) -> Workflow:
        path = f"/workflows/{_segment(workflow_id)}"
        return cast(Workflow, await self._object("PUT", path, body=dict(body)))

    async def delete_workflow(self, workflow_id: str) -> None:
        await self.request("DELETE", f"/workflows/{_segment(workflow_id)}")

    async def _switch(self, workflow_id: str, new: str, old: str) -> Workflow:
        base = f"/workflows/{_segment(workflow_id)}"
        if self.legacy_publish is not True:
            try:
                value = await self._object("POST", f"{base}/{new}")
            except (Missing, Rejected) as exc:
                if self.legacy_publish is False or exc.status not in (404, 405):
                    raise
                # The 2.x route is not there (1.x), or the workflow is not: the old
                # route tells which.
            else:
                self.legacy_publish = False
                return cast(Workflow, value)
        value = await self._object("POST", f"{base}/{old}")
        self.legacy_publish = True
        return cast(Workflow, value)

    async def publish(self, workflow_id: str) -> Workflow:
        """Switch a workflow on (2.x publish, 1.x activate)."""
        return await self._switch(workflow_id, "publish", "activate")

    async def unpublish(self, workflow_id: str) -> Workflow:
        """Switch a workflow off (2.x unpublish, 1.x deactivate)."""
        return await self._switch(workflow_id, "unpublish", "deactivate")

    # Executions ------------------------------------------------------------------------

    async def executions(
        self,
        *,
        started_after: str | None = None,
        status: str | None = None,
        workflow_id: str | None = None,
        max_pages: int | None = None,
    ) -> AsyncIterator[list[Execution]]:
        params = {
            "includeData": "false",
            "startedAfter": started_after,
            "status": status,
            "workflowId": workflow_id,
        }
        async for page in self.pages("/executions", params, max_pages=max_pages):
            yield cast(ExecutionList, {"data": page})["data"]

    async def execution(self, execution_id: str, *, include_data: bool = False) -> Execution:
        path = f"/executions/{_segment(execution_id)}"
        params = {"includeData": "true" if include_data else "false"}
        return cast(Execution, await self._object("GET", path, params=params))

    async def retry_execution(self, execution_id: str, *, load_workflow: bool) -> Execution:
        body: RetryBody = {"loadWorkflow": load_workflow}
        path = f"/executions/{_segment(execution_id)}/retry"
        return cast(Execution, await self._object("POST", path, body=dict(body)))

    async def credentials(self) -> list[Credential]:
        """Every credential's id, name and type (no secrets); n8n answers 403 to a key
        without `credential:list` (only owner and admin keys have it)."""
        out: list[Credential] = []
        async for page in self.pages("/credentials", {}):
            out += cast(CredentialList, {"data": page})["data"]
        return out

    async def tags(self) -> list[Tag]:
        out: list[Tag] = []
        async for page in self.pages("/tags", {}):
            out += cast(list[Tag], page)
        return out

    # What the instance is --------------------------------------------------------------

    async def version(self) -> str | None:
        """n8n's version, from the settings its own front end reads (`/rest/settings`,
        no key needed); None when that is not offered."""
        try:
            value = await self.request("GET", "/rest/settings", api=False)
        except (Missing, Forbidden, Unauthorized, Rejected):
            return None
        data = value.get("data", value) if isinstance(value, dict) else None
        version = data.get("versionCli") if isinstance(data, dict) else None
        return str(version)[:50] if isinstance(version, str) and version else None

    async def probe(self) -> Probe:
        """Check the URL and key: one workflows call must succeed (a wrong key raises
        Unauthorized, an unreachable URL Unreachable); then which read scopes the key
        holds, and the version."""
        capabilities: dict[str, bool] = {}
        await self._object("GET", "/workflows", params={"limit": 1, "excludePinnedData": "true"})
        capabilities["workflow:list"] = True
        for scope, path in (("execution:list", "/executions"), ("tag:list", "/tags")):
            try:
                await self._object("GET", path, params={"limit": 1})
                capabilities[scope] = True
            except (Forbidden, Missing):
                capabilities[scope] = False
        version = await self.version()
        major = _major(version)
        if major is None:
            major = await self._publish_generation()
        if major is not None:
            self.legacy_publish = major < 2
        return Probe(version=version, major=major, capabilities=capabilities)

    async def _publish_generation(self) -> int | None:
        """2 when the instance has the 2.x publish route, 1 when it has not. n8n 2.x
        does not tell its version without a browser session, so the route is asked about
        a workflow id that cannot exist: 2.x refuses it as a workflow (403/404 with its
        own message), 1.x does not know the route (404/405 "not allowed"/"Cannot")."""
        try:
            await self.request("POST", "/workflows/0-studio-probe/publish")
        except (Missing, Rejected, Forbidden) as exc:
            text = exc.message.lower()
            if exc.status == 405 or "not allowed" in text or "cannot post" in text:
                return 1
            return 2 if exc.status in (403, 404) else None
        except N8nFailure:
            return None
        return 2


def _major(version: str | None) -> int | None:
    match = re.match(r"^\s*v?(\d+)\.", version or "")
    return int(match.group(1)) if match else None


def _segment(value: str) -> str:
    """An id as one path segment: n8n ids are short alphanumerics; anything else would
    let a caller's id walk to another route."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        raise Rejected(f"not an n8n id: {value[:80]!r}")
    return value


def client_for(
    settings: Settings, base_url: str, api_key: str, *, legacy_publish: bool | None = None
) -> N8nClient:
    return N8nClient(settings, base_url, api_key, legacy_publish=legacy_publish)
