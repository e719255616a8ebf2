"""file_read / file_write nodes: files in the run's workspace storage (backend.kit.storage),
never outside it."""

from __future__ import annotations

import base64
import binascii
import json
import mimetypes
from typing import Any

from backend.kit.storage import PathRefused, StorageError, normalise, storage_for
from backend.workflows.graph import FileReadAction, FileWriteAction
from workers.engine.retry import NodeFailure
from workers.nodes.base import NodeContext, NodeResult


def _failure(exc: StorageError) -> NodeFailure:
    # Missing files, refused paths and size caps fail the same way on every attempt.
    if exc.transient:
        return NodeFailure(str(exc), "connection")
    return NodeFailure(str(exc), "permanent")


def _path(ctx: NodeContext, template: str) -> str:
    try:
        return normalise(ctx.render(template))
    except PathRefused as exc:
        raise NodeFailure(str(exc), "permanent") from None


async def file_read(ctx: NodeContext, config: FileReadAction) -> NodeResult:
    path = _path(ctx, config.path)
    settings = ctx.settings
    # The content becomes the node's output, so a file larger than an output may be is
    # refused before it is read, not after.
    limit = min(settings.storage.max_read_bytes, settings.engine.max_output_bytes)
    try:
        data = await storage_for(settings).read(ctx.workspace_id, path, max_bytes=limit)
    except StorageError as exc:
        raise _failure(exc) from None
    output: dict[str, Any] = {
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
    path = _path(ctx, config.path)
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
    try:
        size = await storage_for(ctx.settings).write(ctx.workspace_id, path, data)
    except StorageError as exc:
        raise _failure(exc) from None
    return NodeResult(output={"path": path, "size": size})
