"""/api/v1/tools/files: upload (multipart, size-capped, type sniffed), metadata,
download, delete, list."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from backend.auth.dependencies import SettingsDep, WorkspaceAccess, require
from backend.auth.permissions import Permission
from backend.files import service
from backend.files.schemas import FileRead
from backend.kit.db import UnitOfWorkDep
from backend.kit.errors import ValidationFailed
from backend.kit.pagination import Page, PageParamsDep
from backend.kit.storage import StorageError
from backend.models import File

router = APIRouter(prefix="/tools/files", tags=["files"])
READ = Permission.WORKFLOWS_READ
WRITE = Permission.WORKFLOWS_WRITE


def _on(permission: Permission) -> WorkspaceAccess:
    result: WorkspaceAccess = require(permission, resource=File, param="file_id")
    return result


@router.post(
    "/upload",
    status_code=status.HTTP_201_CREATED,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                        "required": ["file"],
                    }
                }
            },
        }
    },
)
async def upload_file(
    request: Request,
    uow: UnitOfWorkDep,
    settings: SettingsDep,
    access: WorkspaceAccess = require(WRITE, scope="header"),
) -> FileRead:
    limit = settings.tools.max_upload_bytes
    if "multipart/form-data" not in request.headers.get("content-type", ""):
        raise ValidationFailed("send the file as multipart/form-data, field 'file'", field="file")
    try:
        form = await request.form(max_files=1, max_fields=5)
    except Exception as exc:  # the multipart parser's own errors
        raise ValidationFailed(f"unreadable multipart body: {exc}", field="file") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise ValidationFailed("send the file in the multipart field 'file'", field="file")
    data = await upload.read(limit + 1)
    await form.close()
    if len(data) > limit:
        raise HTTPException(413, f"the file is larger than {limit} bytes (TOOLS__MAX_UPLOAD_BYTES)")
    file = await service.upload(
        uow, settings, access, name=upload.filename, data=data, declared_type=upload.content_type
    )
    return FileRead.model_validate(file)


@router.get("")
async def list_files(
    uow: UnitOfWorkDep,
    page: PageParamsDep,
    q: Annotated[str | None, Query(max_length=200)] = None,
    access: WorkspaceAccess = require(READ, scope="header"),
) -> Page[FileRead]:
    items, total = await service.list_files(uow, access, limit=page.limit, offset=page.offset, q=q)
    return Page(
        items=[FileRead.model_validate(f) for f in items],
        total=total,
        limit=page.limit,
        offset=page.offset,
    )


@router.get(
    "/{file_id}",
    responses={
        200: {
            "description": "metadata, or with ?download=1 the file's bytes",
            "content": {"application/octet-stream": {}},
        }
    },
)
async def get_file(
    settings: SettingsDep,
    download: Annotated[bool, Query()] = False,
    access: WorkspaceAccess = _on(READ),
) -> Any:
    file: File = access.resource
    if not download:
        return FileRead.model_validate(file)
    try:
        data = await service.read_bytes(settings, file, max_bytes=max(file.size, 1))
    except StorageError as exc:
        raise ValidationFailed(f"the file's bytes could not be read: {exc}") from exc
    active = file.content_type.split(";")[0].strip() in service.ACTIVE_TYPES
    media = "application/octet-stream" if active else file.content_type
    return Response(
        content=data,
        media_type=media,
        headers={
            # attachment: never rendered in the API's origin; the name RFC 5987-encoded.
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(file.name)}",
            "X-Content-Type-Options": "nosniff",
            "ETag": f'"{file.sha256}"',
            "Cache-Control": "private, no-store",
        },
    )


@router.delete("/{file_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_file(
    uow: UnitOfWorkDep, settings: SettingsDep, access: WorkspaceAccess = _on(WRITE)
) -> None:
    await service.delete(uow, settings, access)
