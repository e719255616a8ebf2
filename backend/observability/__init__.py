"""Observability: Prometheus metrics of the API and the workers, and OpenTelemetry
traces. Nothing here changes behaviour; it watches the request path, the lifecycle's
finished listeners, Celery's signals and the log events the engine already writes."""
