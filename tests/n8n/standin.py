"""A loopback stand-in for an n8n instance's public API v1, for the fast tests.

It keeps workflows and executions in memory and answers the operations our client uses
in n8n's shapes; every answer is validated against n8n's own OpenAPI spec (tests/n8n/
spec.py) and any mismatch is recorded in `violations`, which the tests assert empty. It
can play n8n 1.x (no publish/unpublish routes), require the key, answer scripted faults
(`faults`: statuses for the next calls, with Retry-After on 429), and, like n8n, build an
Error Trigger payload when an execution fails in a workflow whose settings name an error
workflow (`fail`)."""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tests.n8n import spec
from tests.support.procs import free_port

API = "/api/v1"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    body: Any


@dataclass
class StandIn:
    host: str = "127.0.0.1"
    api_key: str = "n8n_api_standin_key"
    version: str = "2.41.1"
    port: int = field(default_factory=free_port)
    workflows: dict[str, dict[str, Any]] = field(default_factory=dict)
    executions: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    # Statuses to answer the next API calls with, in order (then normal service).
    faults: list[int] = field(default_factory=list)
    # One-shot faults for one route: (method, path suffix, status), used in order.
    route_faults: list[tuple[str, str, int]] = field(default_factory=list)
    credentials: dict[str, dict[str, Any]] = field(default_factory=dict)
    # False: GET /credentials answers 403, as for a key without credential:list.
    credential_list: bool = True
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1000))

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def legacy(self) -> bool:
        return self.version.startswith("1.")

    def reset(self) -> None:
        self.workflows.clear()
        self.executions.clear()
        self.calls.clear()
        self.violations.clear()
        self.faults.clear()
        self.route_faults.clear()
        self.credentials.clear()
        self.credential_list = True
        self.version = "2.41.1"

    # Seeding ---------------------------------------------------------------------------

    def add_workflow(
        self, name: str, *, active: bool = False, tags: list[str] | None = None,
        nodes: int = 2, settings: dict[str, Any] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        wid = f"wf{next(self.ids)}"
        made: list[dict[str, Any]] = [
            {
                "id": f"{wid}-n{i}",
                "name": "Webhook" if i == 0 else f"Step {i}",
                "type": "n8n-nodes-base.webhook" if i == 0 else "n8n-nodes-base.set",
                "typeVersion": 1,
                "position": [i * 200, 0],
                "parameters": {},
            }
            for i in range(nodes)
        ]
        workflow = {
            "id": wid,
            "name": name,
            "active": active,
            "isArchived": False,
            "createdAt": _now(),
            "updatedAt": _now(),
            "versionId": f"v-{wid}-1",
            "activeVersionId": f"v-{wid}-1" if active else None,
            "triggerCount": 1,
            "nodes": made,
            "connections": {},
            "settings": settings or {"executionOrder": "v1"},
            "staticData": None,
            "nodeGroups": [],
            "meta": None,
            "shared": [
                {"role": "workflow:owner", "workflowId": wid, "projectId": "proj1",
                 "createdAt": _now(), "updatedAt": _now()}
            ],
            "activeVersion": None,
            "tags": [
                {"id": f"t{i}", "name": t, "createdAt": _now(), "updatedAt": _now()}
                for i, t in enumerate(tags or [])
            ],
        }  # fmt: skip
        self.workflows[wid] = workflow
        return workflow

    def add_execution(
        self, workflow_id: str, status: str = "success", *, started: datetime | None = None,
        error: str | None = None, node: str | None = None, mode: str = "trigger",
        retry_of: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        eid = str(next(self.ids))
        start = started or datetime.now(UTC)
        running = status in ("running", "new", "unknown")
        execution: dict[str, Any] = {
            "id": eid,
            "finished": status == "success",
            "mode": mode,
            "retryOf": retry_of,
            "retrySuccessId": None,
            "status": status,
            "startedAt": start.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "stoppedAt": None if running else (start + timedelta(seconds=1)).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "workflowId": workflow_id,
            "waitTill": None,
            "_error": {"message": error, "node": node} if error else None,
        }  # fmt: skip
        self.executions[eid] = execution
        return execution

    def fail(self, workflow_id: str, message: str, node: str) -> tuple[dict[str, Any], str | None]:
        """A failed execution; and, as n8n would send it, the Error Trigger payload and
        the URL the error workflow's HTTP node posts it to (None: no error workflow, or
        one that is not active, which n8n 2.x skips)."""
        execution = self.add_execution(workflow_id, "error", error=message, node=node)
        workflow = self.workflows[workflow_id]
        payload = {
            "execution": {
                "id": execution["id"],
                "url": f"{self.base}/workflow/{workflow_id}/executions/{execution['id']}",
                "error": {"message": message, "stack": "Error: ...", "node": {"name": node}},
                "lastNodeExecuted": node,
                "mode": execution["mode"],
            },
            "workflow": {"id": workflow_id, "name": workflow["name"]},
        }
        error_id = (workflow.get("settings") or {}).get("errorWorkflow")
        handler = self.workflows.get(error_id or "")
        if handler is None or not handler["active"]:
            return payload, None
        for n in handler["nodes"]:
            if n["type"] == "n8n-nodes-base.httpRequest":
                return payload, str(n["parameters"]["url"])
        return payload, None

    def add_credential(self, name: str, type_: str) -> dict[str, Any]:
        cid = f"cr{next(self.ids)}"
        self.credentials[cid] = {"id": cid, "name": name, "type": type_, "createdAt": _now(),
                                 "updatedAt": _now(), "shared": []}  # fmt: skip
        return self.credentials[cid]

    # Views -----------------------------------------------------------------------------

    def single(self, workflow: dict[str, Any]) -> dict[str, Any]:
        """One workflow as GET/PUT and publish answer it (more fields than a list item)."""
        project = {"id": "proj1", "name": "Owner <owner@example.com>", "type": "personal",
                   "icon": None, "description": None, "customTelemetryTags": [],
                   "creatorId": None, "createdAt": workflow["createdAt"],
                   "updatedAt": workflow["updatedAt"]}  # fmt: skip
        shared = [{**share, "project": project} for share in workflow["shared"]]
        return {**workflow, "description": None, "versionCounter": 1, "sourceWorkflowId": None,
                "shared": shared}  # fmt: skip

    def full(self, execution: dict[str, Any], include_data: bool) -> dict[str, Any]:
        """One execution as GET /executions/{id} answers it."""
        return {**self.public(execution, include_data), "createdAt": execution["startedAt"],
                "deletedAt": None, "storedAt": "db", "tracingContext": None,
                "deduplicationKey": None, "jsonSizeBytes": 0, "binaryDataSizeBytes": 0,
                "workflowVersionId": None, "usedPrivateCredentials": False}  # fmt: skip

    def public(self, execution: dict[str, Any], include_data: bool) -> dict[str, Any]:
        out = {k: v for k, v in execution.items() if not k.startswith("_")}
        if include_data:
            error = execution.get("_error")
            result: dict[str, Any] = {"runData": {}}
            if error:
                result["error"] = {"message": error["message"], "node": {"name": error["node"]}}
                result["lastNodeExecuted"] = error["node"]
            out["data"] = {"resultData": result}
        return out


def _cursor(offset: int) -> str:
    return base64.b64encode(json.dumps({"offset": offset}).encode()).decode()


def _offset(cursor: str | None) -> int:
    if not cursor:
        return 0
    return int(json.loads(base64.b64decode(cursor))["offset"])


def build_app(s: StandIn) -> FastAPI:
    app = FastAPI()

    def reply(template: str, method: str, status: int, body: Any) -> Response:
        problems = spec.check_answer(template, method, status, body)
        s.violations += [f"{method} {template} {status}: {p}" for p in problems]
        if body is None:
            return Response(status_code=status)
        return JSONResponse(body, status_code=status)

    def refuse(status: int, message: str) -> Response:
        return JSONResponse({"message": message}, status_code=status)

    @app.middleware("http")
    async def gate(request: Request, call_next: Any) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        s.calls.append(Call(request.method, request.url.path, dict(request.query_params), body))
        if request.url.path.startswith(API):
            if request.headers.get("x-n8n-api-key") != s.api_key:
                return refuse(401, "unauthorized")
            if s.faults:
                status = s.faults.pop(0)
                headers = {"Retry-After": "0"} if status == 429 else None
                return JSONResponse({"message": f"fault {status}"}, status_code=status,
                                    headers=headers)  # fmt: skip
            for fault in s.route_faults:
                method, suffix, status = fault
                if request.method == method and request.url.path.endswith(suffix):
                    s.route_faults.remove(fault)
                    return JSONResponse({"message": f"fault {status}"}, status_code=status)
        response: Response = await call_next(request)
        return response

    @app.get("/rest/settings")
    async def settings() -> dict[str, Any]:
        # n8n 2.x tells its version only to a signed-in browser session; 1.x to anyone.
        return {"data": {"versionCli": s.version} if s.legacy else {"authCookie": {}}}

    def page(items: list[dict[str, Any]], request: Request) -> dict[str, Any]:
        limit = min(int(float(request.query_params.get("limit", 100))), 250)
        start = _offset(request.query_params.get("cursor"))
        chunk = items[start : start + limit]
        more = start + limit < len(items)
        return {"data": chunk, "nextCursor": _cursor(start + limit) if more else None}

    @app.get(API + "/workflows")
    async def list_workflows(request: Request) -> Response:
        items = list(s.workflows.values())
        active = request.query_params.get("active")
        if active is not None:
            items = [w for w in items if w["active"] == (active == "true")]
        return reply("/workflows", "get", 200, page(items, request))

    @app.post(API + "/workflows")
    async def create_workflow(request: Request) -> Response:
        body = await request.json()
        problems = spec.violations(spec.request_schema("/workflows", "post"), body)
        if problems:
            return refuse(400, "request/body " + problems[0])
        made = s.add_workflow(body["name"], nodes=0, settings=body["settings"])
        made.update(nodes=body["nodes"], connections=body["connections"])
        return reply("/workflows", "post", 200, {**s.single(made), "parentFolder": None})

    @app.get(API + "/workflows/{wid}")
    async def get_workflow(wid: str) -> Response:
        if wid not in s.workflows:
            return refuse(404, "Not Found")
        return reply("/workflows/{workflowId}", "get", 200, s.single(s.workflows[wid]))

    @app.put(API + "/workflows/{wid}")
    async def put_workflow(wid: str, request: Request) -> Response:
        if wid not in s.workflows:
            return refuse(404, "Not Found")
        body = await request.json()
        problems = spec.violations(spec.request_schema("/workflows/{workflowId}", "put"), body)
        if problems:
            return refuse(400, "request/body " + problems[0])
        workflow = s.workflows[wid]
        workflow.update({k: body[k] for k in ("name", "nodes", "connections", "settings")})
        workflow["updatedAt"] = _now()
        workflow["versionId"] = f"v-{wid}-{time.monotonic_ns()}"
        return reply("/workflows/{workflowId}", "put", 200, s.single(workflow))

    @app.get(API + "/credentials")
    async def list_credentials(request: Request) -> Response:
        if not s.credential_list:
            return refuse(403, "Forbidden")
        return reply("/credentials", "get", 200, page(list(s.credentials.values()), request))

    @app.post(API + "/credentials")
    async def create_credential(request: Request) -> Response:
        body = await request.json()
        problems = spec.violations(spec.request_schema("/credentials", "post"), body)
        if problems:
            return refuse(400, "request/body " + problems[0])
        made = s.add_credential(body["name"], body["type"])
        out = {k: v for k, v in made.items() if k != "shared"}
        out.update(isManaged=False, isGlobal=False, isResolvable=False,
                   resolvableAllowFallback=False, resolverId=None)  # fmt: skip
        return reply("/credentials", "post", 200, out)

    @app.delete(API + "/workflows/{wid}")
    async def delete_workflow(wid: str) -> Response:
        if wid not in s.workflows:
            return refuse(404, "Not Found")
        gone = s.single(s.workflows.pop(wid))
        return reply("/workflows/{workflowId}", "delete", 200, gone)

    def switch(wid: str, on: bool, template: str) -> Response:
        if wid not in s.workflows:
            return refuse(404, "Not Found")
        workflow = s.workflows[wid]
        workflow["active"] = on
        workflow["activeVersionId"] = workflow["versionId"] if on else None
        return reply(template, "post", 200, s.single(workflow))

    @app.post(API + "/workflows/{wid}/publish")
    async def publish(wid: str) -> Response:
        if s.legacy:  # a route 1.x does not have, answered as n8n's validator does
            return refuse(405, "POST method not allowed")
        if wid not in s.workflows:  # 2.x, as the real one answers an unknown id
            return refuse(403, "You do not have permission to activate this workflow.")
        return switch(wid, True, "/workflows/{workflowId}/publish")

    @app.post(API + "/workflows/{wid}/unpublish")
    async def unpublish(wid: str) -> Response:
        if s.legacy:
            return refuse(405, "POST method not allowed")
        return switch(wid, False, "/workflows/{workflowId}/unpublish")

    @app.post(API + "/workflows/{wid}/activate")
    async def activate(wid: str) -> Response:
        return switch(wid, True, "/workflows/{workflowId}/activate")

    @app.post(API + "/workflows/{wid}/deactivate")
    async def deactivate(wid: str) -> Response:
        return switch(wid, False, "/workflows/{workflowId}/deactivate")

    @app.get(API + "/executions")
    async def list_executions(request: Request) -> Response:
        q = request.query_params
        items = sorted(s.executions.values(), key=lambda e: int(e["id"]), reverse=True)
        if q.get("status"):
            items = [e for e in items if e["status"] == q["status"]]
        if q.get("workflowId"):
            items = [e for e in items if e["workflowId"] == q["workflowId"]]
        if q.get("startedAfter"):
            after = datetime.fromisoformat(q["startedAfter"].replace("Z", "+00:00"))
            items = [
                e for e in items
                if datetime.fromisoformat(e["startedAt"].replace("Z", "+00:00")) > after
            ]  # fmt: skip
        data = page([s.public(e, False) for e in items], request)
        return reply("/executions", "get", 200, data)

    @app.get(API + "/executions/{eid}")
    async def get_execution(eid: str, request: Request) -> Response:
        if eid not in s.executions:
            return refuse(404, "Not Found")
        include = request.query_params.get("includeData") == "true"
        body = s.full(s.executions[eid], include)
        return reply("/executions/{executionId}", "get", 200, body)

    @app.post(API + "/executions/{eid}/retry")
    async def retry(eid: str) -> Response:
        original = s.executions.get(eid)
        if original is None:
            return refuse(404, "Not Found")
        if original["status"] not in ("error", "crashed", "canceled"):
            return refuse(409, "The execution succeeded, so it cannot be retried.")
        new = s.add_execution(original["workflowId"], "success", mode="retry", retry_of=eid)
        body = {**s.public(new, False), "data": {}, "customData": {}, "storedAt": "db",
                "workflowData": s.workflows.get(new["workflowId"], {})}  # fmt: skip
        return reply("/executions/{executionId}/retry", "post", 200, body)

    @app.get(API + "/tags")
    async def tags(request: Request) -> Response:
        names = sorted({t["name"] for w in s.workflows.values() for t in w["tags"]})
        items = [{"id": f"t{i}", "name": n, "createdAt": _now(), "updatedAt": _now()}
                 for i, n in enumerate(names)]  # fmt: skip
        return reply("/tags", "get", 200, page(items, request))

    return app


@contextmanager
def running(standin: StandIn | None = None) -> Iterator[StandIn]:
    s = standin or StandIn()
    server = uvicorn.Server(
        uvicorn.Config(build_app(s), host=s.host, port=s.port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("n8n stand-in did not start")
        time.sleep(0.02)
    try:
        yield s
    finally:
        server.should_exit = True
        thread.join(10)
