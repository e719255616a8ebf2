"""Every ORM model, imported here so Alembic and the mappers see them all at once."""

from backend.models.base import Base, RecordModel
from backend.models.identity import User, Workspace

__all__ = ["Base", "RecordModel", "User", "Workspace"]
