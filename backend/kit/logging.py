"""Structured logging: structlog for our lines, stdlib (uvicorn, celery, sqlalchemy) routed
through the same processors so every line is JSON in production and readable in
development, and every line of a request or task carries its request id."""

from __future__ import annotations

import logging
import logging.config
from collections.abc import MutableMapping
from typing import Any

import structlog
from opentelemetry import trace

from backend.config import Settings

REQUEST_ID_KEY = "request_id"

# Keys whose values are never written to a log line, whoever passes them.
_REDACTED_KEYS = frozenset(
    {"password", "secret", "token", "access_token", "refresh_token", "api_key", "authorization"}
)


def _redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in event_dict.keys() & _REDACTED_KEYS:
        event_dict[key] = "[redacted]"
    return event_dict


def _trace_ids(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # The OpenTelemetry span in progress (backend/observability/tracing.py), if any: a
    # log line and its trace can be joined. Without tracing the span is the invalid one.
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict["trace_id"] = format(context.trace_id, "032x")
        event_dict["span_id"] = format(context.span_id, "016x")
    return event_dict


def configure_logging(settings: Settings) -> None:
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        _trace_ids,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if settings.log_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "structlog": {
                    "()": structlog.stdlib.ProcessorFormatter,
                    "foreign_pre_chain": shared,
                    "processors": [
                        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.format_exc_info,
                        renderer,
                    ],
                }
            },
            "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "structlog"}},
            "root": {"handlers": ["default"], "level": settings.log.level},
            "loggers": {
                # uvicorn installs its own handlers; send its lines through ours instead.
                "uvicorn": {"handlers": [], "propagate": True},
                "uvicorn.error": {"handlers": [], "propagate": True},
                # The request middleware logs each request with its id and timing.
                "uvicorn.access": {"handlers": [], "propagate": False},
            },
        }
    )
    structlog.configure(
        # filter_by_level first: a line below the level (the per-request access line
        # under LOG__LEVEL=WARNING) is dropped before the processors build it, not after;
        # the stdlib logger would drop it by the same test.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def get_logger(name: str | None = None) -> Any:
    return structlog.stdlib.get_logger(name)


def current_request_id() -> str | None:
    value = structlog.contextvars.get_contextvars().get(REQUEST_ID_KEY)
    return value if isinstance(value, str) else None
