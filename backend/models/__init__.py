"""Every ORM model, imported here so Alembic and the mappers see them all at once."""

from backend.models.base import Base, RecordModel
from backend.models.identity import (
    ActivityLog,
    ApiKey,
    AuthSession,
    Invitation,
    OtpCode,
    User,
    Workspace,
    WorkspaceMember,
)

__all__ = [
    "ActivityLog",
    "ApiKey",
    "AuthSession",
    "Base",
    "Invitation",
    "OtpCode",
    "RecordModel",
    "User",
    "Workspace",
    "WorkspaceMember",
]
