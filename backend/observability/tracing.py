"""OpenTelemetry traces, on only when OTEL_EXPORTER_OTLP_ENDPOINT (or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set: one trace from the HTTP request through the
Celery task to each node and each outbound call.

Instrumented once each:
- API requests: FastAPI's own telemetry (0.165+ creates the server span as soon as a
  global tracer provider exists; adding opentelemetry-instrumentation-fastapi on top
  would give every request two server spans, so it is not used).
- Celery: opentelemetry-instrumentation-celery, in the API (the publish span, and the
  context carried in the message headers) and in the worker (the task span). The
  engine's event loop takes the task thread's context with each coroutine it is handed
  (call_soon_threadsafe copies it), so the runs' spans are the task span's children.
- Engine nodes: `traced_handlers` wraps the node handler table of a worker process
  with one span per node attempt (workers/tracing.py calls it); with tracing off
  nothing is wrapped, so the engine's hot path is untouched.
- Outbound HTTP: opentelemetry-instrumentation-httpx on every httpx client, which
  covers HTTP nodes, the anthropic SDK (model calls) and MCP's HTTP transports.
Log lines carry `trace_id` and `span_id` (backend/kit/logging.py) while a span is on.

The exporter is OTLP over HTTP/protobuf and reads the SDK's own variables
(OTEL_EXPORTER_OTLP_ENDPOINT, _HEADERS, _TIMEOUT, OTEL_BSP_*); TRACING__SERVICE_NAME
names the service and TRACING__SAMPLE_RATIO keeps a fraction of traces (parent-based).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from backend.config import Settings
from backend.kit.logging import get_logger

log = get_logger(__name__)

_lock = threading.Lock()
_enabled = False
H = TypeVar("H", bound=Callable[..., Awaitable[Any]])


def wanted() -> bool:
    """Whether this process should export traces (the SDK's variables decide)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def enabled() -> bool:
    return _enabled


def setup(settings: Settings, role: str) -> bool:
    """Install the global tracer provider and the Celery and httpx instrumentations,
    once per process; False (and nothing done) when tracing is not configured."""
    global _enabled
    if not wanted():
        return False
    with _lock:
        if _enabled:
            return True
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        provider = TracerProvider(
            resource=Resource.create(
                {
                    "service.name": settings.tracing.service_name,
                    "service.namespace": "orchestration-studio",
                    "orch.process": role,
                    "deployment.environment": settings.environment,
                }
            ),
            sampler=ParentBased(TraceIdRatioBased(settings.tracing.sample_ratio)),
        )
        # The batch processor re-creates its export thread in forked children (Celery's
        # prefork pool), so a provider set up in the worker's parent serves them all.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        CeleryInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
        HTTPXClientInstrumentor().instrument(tracer_provider=provider)
        _enabled = True
    log.info("tracing.enabled", role=role, service=settings.tracing.service_name)
    return True


def flush(timeout_ms: int = 5000) -> None:
    """Send what is buffered now (a worker child about to exit, a test)."""
    provider = trace.get_tracer_provider()
    force = getattr(provider, "force_flush", None)
    if callable(force):
        force(timeout_ms)


_tracer = trace.get_tracer("orchestration_studio.engine")


def traced(kind: str, handler: H) -> H:
    """`handler` (a node handler: `await handler(ctx)`) inside a span per attempt."""

    async def run(ctx: Any) -> Any:
        node_id = getattr(ctx, "key", None) or getattr(getattr(ctx, "node", None), "id", "")
        attributes: dict[str, str | int] = {
            "orch.node.id": str(node_id),
            "orch.node.type": kind,
            "orch.node.attempt": int(getattr(ctx, "attempt", 1) or 1),
            "orch.execution.id": str(getattr(ctx, "execution_id", "")),
            "orch.workspace.id": str(getattr(ctx, "workspace_id", "")),
        }
        with _tracer.start_as_current_span(
            f"node {kind}", kind=SpanKind.INTERNAL, attributes=attributes,
            record_exception=True, set_status_on_exception=True,
        ) as span:  # fmt: skip
            result = await handler(ctx)
            span.set_attribute("orch.node.input_tokens", int(getattr(result, "input_tokens", 0)))
            span.set_attribute("orch.node.output_tokens", int(getattr(result, "output_tokens", 0)))
            span.set_status(Status(StatusCode.OK))
            return result

    run.__name__ = getattr(handler, "__name__", "run")
    run.__wrapped__ = handler  # type: ignore[attr-defined]
    return run  # type: ignore[return-value]


def traced_handlers(handlers: MutableMapping[str, Any]) -> None:
    """Wrap every node handler of this table in place (once), when tracing is on."""
    if not _enabled:
        return
    for kind, handler in list(handlers.items()):
        if not hasattr(handler, "__wrapped__"):
            handlers[kind] = traced(kind, handler)


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the span in progress, or None."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")
