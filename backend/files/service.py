"""Uploaded files: the bytes go to the workspace's storage area (local or S3, see
backend/kit/storage.py) under `.uploads/<file id>`, the metadata (name, size, sniffed
content type, sha256) to the `files` table. The same functions serve the API and the
file_read / file_write nodes that address a file by id."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mimetypes
import os
import unicodedata
import uuid
from collections.abc import Sequence
from pathlib import Path

import filetype  # type: ignore[import-untyped]
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.activity.service import record
from backend.auth.dependencies import WorkspaceAccess
from backend.config import Settings
from backend.kit.db import UnitOfWork
from backend.kit.errors import NotFound, ValidationFailed
from backend.kit.repository import Repository
from backend.kit.storage import LocalStorage, S3Storage, StorageError, storage_for
from backend.models import File

UPLOADS = ".uploads"
# Types a browser would render or run if served inline: always downloaded as bytes.
ACTIVE_TYPES = ("text/html", "application/xhtml+xml", "image/svg+xml", "application/javascript")


class FileRepository(Repository[File]):
    model = File


def storage_key(file_id: uuid.UUID) -> str:
    return f"{UPLOADS}/{file_id}"


def clean_name(name: str | None) -> str:
    """A display name: the last path segment, no control characters, at most 255
    characters. Never used as a path (the storage key is the id)."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if unicodedata.category(c)[0] != "C").strip()
    return (base or "file")[:255]


def sniff(data: bytes, name: str, declared: str | None) -> str:
    """The content type from the bytes' signature; else from the name's extension; else
    text/plain for UTF-8 text and application/octet-stream otherwise. The client's
    declared type is never trusted on its own."""
    kind = filetype.guess(data[:8192]) if data else None
    if kind is not None:
        return str(kind.mime)
    guessed = mimetypes.guess_type(name)[0]
    try:
        data[:65536].decode("utf-8")
        is_text = b"\x00" not in data[:65536]
    except UnicodeDecodeError:
        is_text = False
    if guessed and (guessed.startswith("text/") or guessed.endswith(("json", "xml", "csv"))):
        return guessed if is_text else "application/octet-stream"
    if is_text:
        return "text/plain"
    return guessed or "application/octet-stream"


async def create(
    session: AsyncSession,
    settings: Settings,
    *,
    workspace_id: uuid.UUID,
    uploaded_by: uuid.UUID | None,
    name: str,
    data: bytes,
    declared_type: str | None = None,
) -> File:
    file = File(
        id=uuid.uuid4(),
        workspace_id=workspace_id,
        uploaded_by=uploaded_by,
        name=clean_name(name),
        size=len(data),
        content_type=sniff(data, name, declared_type),
        sha256=hashlib.sha256(data).hexdigest(),
        storage_key="",
    )
    file.storage_key = storage_key(file.id)
    # Bytes first: a row without its bytes would be a broken download, while bytes
    # without a row (the insert failing after) are only unreferenced storage.
    await storage_for(settings).write(workspace_id, file.storage_key, data)
    session.add(file)
    await session.flush()
    return file


async def upload(
    uow: UnitOfWork,
    settings: Settings,
    access: WorkspaceAccess,
    *,
    name: str | None,
    data: bytes,
    declared_type: str | None,
) -> File:
    if not data:
        raise ValidationFailed("the file is empty", field="file")
    try:
        file = await create(
            uow.session,
            settings,
            workspace_id=access.workspace.id,
            uploaded_by=access.user.id,
            name=name or "file",
            data=data,
            declared_type=declared_type,
        )
    except StorageError as exc:
        raise ValidationFailed(f"storage refused the file: {exc}", field="file") from exc
    record(
        uow.session,
        access.principal,
        workspace_id=access.workspace.id,
        action="file.upload",
        resource_type="file",
        resource_id=file.id,
        details={"name": file.name, "size": file.size},
    )
    return file


async def list_files(
    uow: UnitOfWork, access: WorkspaceAccess, *, limit: int, offset: int, q: str | None
) -> tuple[Sequence[File], int]:
    stmt = select(File).where(File.workspace_id == access.workspace.id)
    if q:
        escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        stmt = stmt.where(File.name.ilike(f"%{escaped}%", escape="\\"))
    stmt = stmt.order_by(File.created_at.desc(), File.id)
    return await FileRepository(uow.session).paginate(stmt, limit=limit, offset=offset)


async def get_in(session: AsyncSession, workspace_id: uuid.UUID, file_id: uuid.UUID) -> File:
    file = await session.get(File, file_id)
    if file is None or file.workspace_id != workspace_id:
        raise NotFound("file not found")
    return file


async def read_bytes(settings: Settings, file: File, *, max_bytes: int) -> bytes:
    return await storage_for(settings).read(
        file.workspace_id, file.storage_key, max_bytes=max_bytes
    )


async def replace(session: AsyncSession, settings: Settings, file: File, data: bytes) -> File:
    """New content for an existing file (file_write by id): bytes, size, hash, type."""
    await storage_for(settings).write(file.workspace_id, file.storage_key, data)
    file.size = len(data)
    file.sha256 = hashlib.sha256(data).hexdigest()
    file.content_type = sniff(data, file.name, None)
    await session.flush()
    return file


async def remove_bytes(settings: Settings, file: File) -> None:
    backend = storage_for(settings)
    if isinstance(backend, LocalStorage):
        _, _, real = backend._resolve(file.workspace_id, file.storage_key)

        def unlink() -> None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(Path(real))

        await asyncio.to_thread(unlink)
    elif isinstance(backend, S3Storage):
        key = backend._key(file.workspace_id, file.storage_key)
        await asyncio.to_thread(backend.client.delete_object, Bucket=backend.bucket, Key=key)


async def delete(uow: UnitOfWork, settings: Settings, access: WorkspaceAccess) -> None:
    file: File = access.resource
    record(
        uow.session,
        access.principal,
        workspace_id=file.workspace_id,
        action="file.delete",
        resource_type="file",
        resource_id=file.id,
        details={"name": file.name},
    )
    await uow.session.delete(file)
    await uow.session.flush()
    # The row goes in this transaction; the bytes once it committed, so a rollback
    # never leaves a row whose bytes are gone.
    # Awaited after the commit, before the response: the client that sees 204 finds
    # the bytes gone too.
    uow.after_commit(lambda: remove_bytes(settings, file))
