"""Domain exceptions. They carry an error code and no HTTP status: main.py maps them."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base of every error a client may see; `code` becomes the body's `error`."""

    code = "error"

    def __init__(
        self, detail: str, *, field: str | None = None, keep_changes: bool = False, **extra: Any
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field
        # The unit of work commits instead of rolling back: the refusal itself is state
        # (a wrong sign-in code counts an attempt, a reused refresh token revokes).
        self.keep_changes = keep_changes
        self.extra = extra


class NotFound(DomainError):
    code = "not_found"


class Conflict(DomainError):
    code = "conflict"


class InvalidTransition(Conflict):
    code = "invalid_transition"


class Unauthenticated(DomainError):
    code = "unauthenticated"


class PermissionDenied(DomainError):
    code = "permission_denied"


class ValidationFailed(DomainError):
    """Input that parsed but breaks a rule (a cycle in a graph, an unknown node id)."""

    code = "validation_error"


class QuotaExceeded(DomainError):
    code = "quota_exceeded"


class RateLimited(DomainError):
    code = "rate_limited"

    def __init__(self, detail: str, *, retry_after_s: int, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.retry_after_s = retry_after_s


class NotConfigured(DomainError):
    """A feature needs a setting nobody set (an API key, say)."""

    code = "not_configured"


class UpstreamError(DomainError):
    """A service we called answered with an error (the model provider, say)."""

    code = "upstream_error"


class DependencyUnavailable(DomainError):
    """A backing service (PostgreSQL, Redis, the broker) did not answer."""

    code = "dependency_unavailable"
