"""The CLI's only way to the product: the public HTTP API, with the credential of the
server in use, refreshing a person's access token when it lapses."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import httpx

from studio import config as cfg
from studio.output import Exit, Failure, fail

API = "/api/v1"
# Refresh this long before the access token lapses, so a request never races its end.
REFRESH_MARGIN_S = 30
TIMEOUT = httpx.Timeout(30.0, connect=5.0)

STATUS_EXIT = {
    400: Exit.USAGE,
    401: Exit.AUTH,
    403: Exit.AUTH,
    404: Exit.NOT_FOUND,
    405: Exit.USAGE,
    409: Exit.CONFLICT,
    413: Exit.USAGE,
    422: Exit.USAGE,
    424: Exit.CONFLICT,
    402: Exit.CONFLICT,
}


@dataclass
class Context:
    """What every command works with: the server, its stored entry, and options."""

    url: str
    config: cfg.Config
    workspace_override: str | None = None
    as_json: bool = False

    @property
    def server(self) -> cfg.Server:
        return self.config.server(self.url)

    @property
    def api_key(self) -> str | None:
        return os.environ.get("STUDIO_API_KEY") or self.server.api_key

    @property
    def workspace_id(self) -> str | None:
        return self.workspace_override or self.server.workspace_id


def resolve_url(option: str | None, config: cfg.Config) -> str:
    return cfg.normalise_url(
        option or os.environ.get("STUDIO_URL") or config.current_url or cfg.DEFAULT_URL
    )


class Client:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.http = httpx.Client(
            base_url=ctx.url, timeout=TIMEOUT, headers={"User-Agent": "studio-cli"}
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # Credentials --------------------------------------------------------------------

    def credential(self, *, required: bool = True) -> str | None:
        """The API key, or a fresh access token (refreshed first when it is about to
        lapse)."""
        if self.ctx.api_key:
            return self.ctx.api_key
        server = self.ctx.server
        if server.access_token:
            if server.access_expires_at and server.access_expires_at - REFRESH_MARGIN_S < (
                time.time()
            ):
                self.refresh()
            return self.ctx.server.access_token
        if required:
            raise fail(
                Exit.AUTH,
                "unauthenticated",
                f"not signed in to {self.ctx.url}",
                hint="run `studio login` (or set STUDIO_API_KEY)",
            )
        return None

    def refresh(self) -> None:
        """Trade the refresh token for a new pair. Another `studio` process may have
        rotated it a moment ago: then its new pair is on disk, and we take that."""
        server = self.ctx.server
        if not server.refresh_token:
            raise fail(Exit.AUTH, "unauthenticated", "session expired", hint="run `studio login`")
        try:
            response = self.http.post(
                f"{API}/auth/refresh", json={"refresh_token": server.refresh_token}
            )
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if response.status_code == 200:
            self.store_pair(response.json())
            return
        latest = cfg.load().server(self.ctx.url)
        if latest.refresh_token and latest.refresh_token != server.refresh_token:
            self.ctx.config.servers[self.ctx.url] = latest
            return
        server.access_token = server.refresh_token = server.access_expires_at = None
        cfg.save(self.ctx.config)
        raise fail(
            Exit.AUTH,
            "unauthenticated",
            "your session ended (signed out elsewhere, or expired)",
            hint="run `studio login` again",
        )

    def store_pair(self, pair: dict[str, Any]) -> None:
        server = self.ctx.server
        server.access_token = pair["access_token"]
        server.refresh_token = pair["refresh_token"]
        server.access_expires_at = time.time() + float(pair.get("expires_in") or 0)
        server.email = (pair.get("user") or {}).get("email", server.email)
        server.api_key = None
        self.ctx.config.current_url = self.ctx.url
        cfg.save(self.ctx.config)

    # Requests -----------------------------------------------------------------------

    def headers(self, *, workspace: bool = True, auth: bool = True) -> dict[str, str]:
        headers: dict[str, str] = {}
        if auth:
            headers["Authorization"] = f"Bearer {self.credential()}"
        # An API key acts in its own workspace; a person names theirs.
        if workspace and self.ctx.workspace_id and not self.ctx.api_key:
            headers["X-Workspace-ID"] = self.ctx.workspace_id
        return headers

    def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
        workspace: bool = True,
        needs_workspace: bool = False,
    ) -> Any:
        """One API call; its JSON body (None for 204). Errors become a Failure with
        the server's error body and the exit code for its status."""
        if auth:
            self.credential()  # "not signed in" comes before "no workspace"
        if needs_workspace and not self.ctx.api_key and not self.ctx.workspace_id:
            raise fail(
                Exit.USAGE,
                "no_workspace",
                "no workspace chosen",
                hint="run `studio workspaces` and `studio workspaces use ID` (or pass --workspace)",
            )
        query = {k: v for k, v in (params or {}).items() if v is not None}
        for attempt in range(2):
            sent = {**self.headers(workspace=workspace, auth=auth), **(headers or {})}
            try:
                response = self.http.request(
                    method, f"{API}{path}", json=json, params=query, headers=sent
                )
            except httpx.HTTPError as exc:
                raise self._unreachable(exc) from None
            if (
                response.status_code == 401
                and attempt == 0
                and auth
                and not self.ctx.api_key
                and self.ctx.server.refresh_token
            ):
                self.refresh()
                continue
            return self._answer(response)
        raise AssertionError("unreachable")  # pragma: no cover

    def _answer(self, response: httpx.Response) -> Any:
        if response.status_code == 204:
            return None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.is_success:
            return body
        if not isinstance(body, dict) or "error" not in body:
            body = {"error": "http_error", "detail": f"HTTP {response.status_code}"}
        body["status"] = response.status_code
        if response.status_code == 401:
            body.setdefault("hint", "run `studio login` (or check STUDIO_API_KEY)")
        code = STATUS_EXIT.get(response.status_code)
        if code is None:
            code = Exit.UNAVAILABLE if response.status_code >= 429 else Exit.USAGE
        raise Failure(code, body)

    def _unreachable(self, exc: Exception) -> Failure:
        return fail(
            Exit.UNAVAILABLE,
            "unreachable",
            f"cannot reach {self.ctx.url}: {type(exc).__name__}: {exc}",
            hint="is the server running? (`make run`; or pass --url / set STUDIO_URL)",
        )
