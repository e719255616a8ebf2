"""One run traced end to end against a loopback OTLP receiver: a real uvicorn and a
real Celery worker (prefork) export to it; the request's server span, the Celery
publish and task spans, a span per node and the HTTP node's outbound call share one
trace, each linked to its parent; the worker's JSON log lines carry the trace id."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backend.config import Settings
from tests.support.crossprocess import signed_in_owner, wait_until_done
from tests.support.fake_anthropic import fake_anthropic
from tests.support.procs import PYTHON, free_port, python_env, running, wait_for
from tests.tracing.receiver import Receiver, Span, otlp_receiver

pytestmark = pytest.mark.xdist_group("crossprocess-b")


@pytest.fixture
def stack(
    database: str, settings: Settings, tmp_path: Path
) -> Iterator[tuple[str, dict[str, str], Receiver, Path]]:
    """uvicorn + worker exporting traces, on a Redis database of their own (no other
    test's worker may take this test's run: its spans would be missing)."""
    worker_number = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    redis_url = os.environ["REDIS_URL"].rsplit("/", 1)[0] + f"/{15 - worker_number}"
    with otlp_receiver() as receiver, fake_anthropic() as (model_url, _):
        env = python_env(
            ANTHROPIC__BASE_URL=model_url,
            ANTHROPIC__API_KEY="test-key",
            ANTHROPIC__MAX_RETRIES="0",
            REDIS_URL=redis_url,
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
            OTEL_BSP_SCHEDULE_DELAY="100",
            TRACING__SERVICE_NAME="studio-under-test",
            HTTP__ALLOW_PRIVATE_NETWORKS='["127.0.0.1/32"]',
            LOG__JSON_OUTPUT="true",
        )
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        web_log, worker_log = tmp_path / "uvicorn.log", tmp_path / "worker.log"
        web = [
            PYTHON,
            "-m",
            "uvicorn",
            "backend.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        worker = [PYTHON, "-m", "celery", "-A", "workers", "worker", "--loglevel=INFO",
                  "--queues=high_priority,default", "--concurrency=1", "--pool=prefork",
                  f"--hostname=tracing-{uuid.uuid4().hex[:6]}@127.0.0.1",
                  "--without-mingle", "--without-gossip"]  # fmt: skip
        with (
            running(web, env=env, log=web_log) as web_proc,
            running(worker, env=env, log=worker_log) as worker_proc,
        ):
            wait_for(
                lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200,
                timeout_s=120, what="uvicorn", proc=web_proc, log=web_log,
            )  # fmt: skip
            wait_for(
                lambda: "ready" in worker_log.read_text(errors="replace"),
                timeout_s=120, what="celery worker", proc=worker_proc, log=worker_log,
            )  # fmt: skip
            yield api, signed_in_owner(database, settings), receiver, worker_log


def _chain(spans: dict[str, Span], leaf: Span) -> list[Span]:
    out = [leaf]
    while out[-1].parent_id and out[-1].parent_id in spans:
        out.append(spans[out[-1].parent_id])
    return out


def test_one_run_is_one_linked_trace_from_request_to_outbound_call(
    stack: tuple[str, dict[str, str], Receiver, Path],
) -> None:
    api, owner, receiver, worker_log = stack
    definition = {
        "nodes": [
            {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
            {"id": "fetch", "type": "action",
             "config": {"kind": "http_request", "url": f"{receiver.url}/hello"}},
            {"id": "think", "type": "agent",
             "config": {"model": "claude-sonnet-5-5", "prompt": "hi"}},
        ],
        "connections": [{"source": "start", "target": "fetch"},
                        {"source": "fetch", "target": "think"}],
    }  # fmt: skip
    r = httpx.post(
        f"{api}/api/v1/workflows", headers=owner, json={"name": "traced", **definition}, timeout=30
    )
    assert r.status_code == 201, r.text
    r = httpx.post(
        f"{api}/api/v1/executions", headers=owner, json={"workflow_id": r.json()["id"]}, timeout=30
    )
    assert r.status_code == 202, r.text
    run_id = r.json()["id"]
    assert wait_until_done(api, owner, run_id, timeout_s=90)["status"] == "completed"

    def outbound() -> list[Span]:
        return [
            s for s in receiver.snapshot()
            if s.kind == "client" and s.process == "worker"
            and "/hello" in str(s.attributes.get("url.full") or s.attributes.get("http.url"))
        ]  # fmt: skip

    wait_for(lambda: bool(outbound()), timeout_s=30, what="the HTTP node's client span")

    def model_calls() -> list[Span]:
        return [
            s for s in receiver.snapshot()
            if s.kind == "client" and "/v1/messages" in str(s.attributes.get("url.full"))
        ]  # fmt: skip

    wait_for(lambda: bool(model_calls()), timeout_s=30, what="the model call's client span")
    time.sleep(0.5)  # the rest of the batch (the task's span ends after the run)
    wait_for(
        lambda: any(s.name.startswith("run/") for s in receiver.snapshot()),
        timeout_s=30, what="the Celery task span",
    )  # fmt: skip
    spans = {s.span_id: s for s in receiver.snapshot()}
    (call,) = outbound()
    chain = _chain(spans, call)
    names = [(s.kind, s.name, s.process) for s in chain]
    # HTTP call <- node span <- ... <- Celery task <- publish <- the API's request.
    assert chain[1].name == "node action", names
    assert chain[1].attributes["orch.node.id"] == "fetch"
    assert chain[1].attributes["orch.execution.id"] == run_id
    kinds = [s.kind for s in chain]
    assert "consumer" in kinds and "producer" in kinds, names
    root = chain[-1]
    assert (root.kind, root.process) == ("server", "api"), names
    assert "/api/v1/executions" in root.name, names
    assert {s.trace_id for s in chain} == {call.trace_id}
    assert {s.service for s in chain} == {"studio-under-test"}
    # Every node has its span in the same trace, under the same task.
    node_spans = [s for s in spans.values() if s.name.startswith("node ")]
    assert {s.attributes["orch.node.id"] for s in node_spans if s.trace_id == call.trace_id} == {
        "start", "fetch", "think",
    }  # fmt: skip
    # The model call (the anthropic SDK's httpx request) is a client span of the agent node.
    model_chain = _chain(spans, model_calls()[0])
    assert model_chain[1].name == "node agent" and model_chain[-1] == root
    # Instrumented once: the admitting request has exactly one server span.
    servers = [s for s in spans.values() if s.trace_id == call.trace_id and s.kind == "server"]
    assert len(servers) == 1, [(s.name, s.attributes) for s in servers]
    # The worker's log lines of this run carry the trace and span ids.
    traced = []
    for line in worker_log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("trace_id") == call.trace_id:
            traced.append(record)
    assert traced, "no worker log line carries the run's trace id"
    assert all(len(r["span_id"]) == 16 for r in traced)
