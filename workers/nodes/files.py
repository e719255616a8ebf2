"""file_read / file_write nodes: files in the run's workspace storage (backend.kit.storage),
never outside it, by path or, for uploaded files (backend.files), by id."""

from __future__ import annotations

import base64
import binascii
import json
import mimetypes
import uuid
from typing import Any

from backend.files import service as files
from backend.kit.db import UnitOfWork
from backend.kit.errors import NotFound
from backend.kit.storage import PathRefused, StorageError, normalise, storage_for
from backend.models import File
from backend.workflows.graph import FileReadAction, FileWriteAction
from workers.engine.retry import NodeFailure
from workers.nodes.base import NodeContext, NodeResult


def _failure(exc: StorageError) -> NodeFailure:
    # Missing files, refused paths and size caps fail the same way on every attempt.
    if exc.transient:
        return NodeFailure(str(exc), "connection")
    return NodeFailure(str(exc), "permanent")


async def _uploaded(ctx: NodeContext, template: str) -> File:
    """The uploaded file a rendered `file_id` names, in this run's workspace only."""
    rendered = ctx.render(template).strip()
    try:
        file_id = uuid.UUID(rendered)
    except ValueError:
        raise NodeFailure(f"file_id {rendered[:80]!r} is not a file id", "permanent") from None
    async with ctx.sessionmaker() as session:
        try:
            return await files.get_in(session, ctx.workspace_id, file_id)
        except NotFound:
            raise NodeFailure(f"file {file_id} not found in this workspace", "permanent") from None


def _path(ctx: NodeContext, template: str) -> str:
    try:
        return normalise(ctx.render(template))
    except PathRefused as exc:
        raise NodeFailure(str(exc), "permanent") from None


async def file_read(ctx: NodeContext, config: FileReadAction) -> NodeResult:
    settings = ctx.settings
    # The content becomes the node's output, so a file larger than an output may be is
    # refused before it is read, not after.
    limit = min(settings.storage.max_read_bytes, settings.engine.max_output_bytes)
    output: dict[str, Any]
    if config.file_id is not None:
        uploaded = await _uploaded(ctx, config.file_id)
        path = uploaded.storage_key
        try:
            data = await files.read_bytes(settings, uploaded, max_bytes=limit)
        except StorageError as exc:
            raise _failure(exc) from None
        output = {
            "file_id": str(uploaded.id),
            "name": uploaded.name,
            "size": len(data),
            "content_type": uploaded.content_type,
        }
    else:
        assert config.path is not None  # the schema wants exactly one of the two
        path = _path(ctx, config.path)
        try:
            data = await storage_for(settings).read(ctx.workspace_id, path, max_bytes=limit)
        except StorageError as exc:
            raise _failure(exc) from None
        output = {
            "path": path,
            "size": len(data),
            "content_type": mimetypes.guess_type(path)[0],
        }
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if config.parse_json:
        if text is None:
            raise NodeFailure(f"{path!r} is not UTF-8 text, so not JSON", "permanent")
        try:
            output["content"] = json.loads(text)
        except ValueError as exc:
            raise NodeFailure(f"{path!r} is not valid JSON: {exc}", "permanent") from None
        output["encoding"] = "json"
    elif text is not None:
        output["content"] = text
        output["encoding"] = "utf-8"
    else:
        # Binary content travels as base64; file_write with encoding=base64 takes it back.
        output["content"] = base64.b64encode(data).decode()
        output["encoding"] = "base64"
    return NodeResult(output=output)


async def file_write(ctx: NodeContext, config: FileWriteAction) -> NodeResult:
    rendered = ctx.render(config.content)
    if config.encoding == "base64":
        try:
            data = base64.b64decode(rendered.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise NodeFailure(
                "content is not valid base64 (encoding: base64)", "permanent"
            ) from None
    else:
        data = rendered.encode()
    if config.file_id is not None:
        uploaded = await _uploaded(ctx, config.file_id)
        try:
            async with UnitOfWork(ctx.sessionmaker) as uow:
                row = await uow.session.get(File, uploaded.id)
                if row is None:
                    raise NodeFailure(f"file {uploaded.id} was deleted", "permanent")
                await files.replace(uow.session, ctx.settings, row, data)
        except StorageError as exc:
            raise _failure(exc) from None
        return NodeResult(
            output={
                "file_id": str(row.id),
                "name": row.name,
                "size": row.size,
                "sha256": row.sha256,
            }
        )
    assert config.path is not None  # the schema wants exactly one of the two
    path = _path(ctx, config.path)
    if path.split("/", 1)[0] == files.UPLOADS:
        # An upload's bytes go with its record (size, hash, sniffed type): written by
        # path, the record went stale and the file could no longer be downloaded.
        raise NodeFailure(
            f"{files.UPLOADS}/ holds uploaded files: write one with file_id", "permanent"
        )
    try:
        size = await storage_for(ctx.settings).write(ctx.workspace_id, path, data)
    except StorageError as exc:
        raise _failure(exc) from None
    return NodeResult(output={"path": path, "size": size})
