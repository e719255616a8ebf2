"""Workspace storage: the files the file_read / file_write nodes see, one confined area
per workspace, on a local directory (default) or an S3-compatible bucket (settings).

A path is always relative to its workspace. It is normalised before anything touches
the backend, and anything that could leave the workspace — `..`, an absolute path, a
NUL byte, a backslash, or (locally) a symlink that resolves outside — is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Protocol

from backend.config import Settings, StorageSettings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MAX_PATH_CHARS = 1024
MAX_LIST = 1000
# Temporary files of in-flight writes; never listed, never a valid name to ask for.
TEMP_PREFIX = ".tmp-"


class StorageError(Exception):
    """A storage operation failed. `transient` says whether trying again may help."""

    transient = False


class PathRefused(StorageError):
    """The path is malformed or would leave the workspace."""


class FileMissing(StorageError):
    pass


class FileTooLarge(StorageError):
    pass


class StorageUnavailable(StorageError):
    """The backend could not be reached or failed on its side; worth another attempt."""

    transient = True


def normalise(path: str) -> str:
    """`path` as a clean relative POSIX path (`a/b.txt`), or PathRefused."""
    if "\x00" in path:
        raise PathRefused("path contains a NUL byte")
    if "\\" in path:
        # A backslash is a separator on some backends and a name character on others:
        # the same string must never mean two different files.
        raise PathRefused("path contains a backslash; use '/' between folders")
    if len(path) > MAX_PATH_CHARS:
        raise PathRefused(f"path is longer than {MAX_PATH_CHARS} characters")
    stripped = path.strip()
    if not stripped:
        raise PathRefused("path is empty")
    if stripped.startswith("/") or re.match(r"[A-Za-z]:", stripped):
        raise PathRefused(f"path {path!r} is absolute; give a path inside the workspace")
    parts = [p for p in PurePosixPath(stripped).parts if p not in ("", ".")]
    if ".." in parts:
        raise PathRefused(f"path {path!r} leaves the workspace ('..' is not allowed)")
    if not parts:
        raise PathRefused(f"path {path!r} names the workspace itself, not a file")
    if any(p.startswith(TEMP_PREFIX) for p in parts):
        raise PathRefused(f"names starting with {TEMP_PREFIX!r} are reserved")
    return "/".join(parts)


class Storage(Protocol):
    async def read(self, workspace_id: uuid.UUID, path: str, *, max_bytes: int) -> bytes: ...

    async def write(self, workspace_id: uuid.UUID, path: str, data: bytes) -> int: ...

    async def exists(self, workspace_id: uuid.UUID, path: str) -> bool: ...

    async def list_files(self, workspace_id: uuid.UUID, prefix: str = "") -> list[str]: ...


class LocalStorage:
    """`<root>/<workspace_id>/<path>`. Writes go to a temporary file in the target's
    folder and are renamed into place, so a reader never sees half a file."""

    def __init__(self, root: str | Path, *, max_write_bytes: int) -> None:
        self.root = Path(root).resolve()
        self.max_write_bytes = max_write_bytes

    def _area(self, workspace_id: uuid.UUID) -> Path:
        return self.root / str(uuid.UUID(str(workspace_id)))

    def _resolve(self, workspace_id: uuid.UUID, path: str) -> tuple[str, Path, Path]:
        rel = normalise(path)
        area = self._area(workspace_id)
        # realpath follows every symlink that exists (a missing tail is appended as
        # is, and it holds no '..'), so a link anywhere on the way is judged by where
        # it really leads.
        real_area = Path(os.path.realpath(area))
        real = Path(os.path.realpath(area / rel))
        if real != real_area and real_area not in real.parents:
            raise PathRefused(f"path {path!r} leads outside the workspace")
        if real == real_area:
            raise PathRefused(f"path {path!r} names the workspace itself, not a file")
        return rel, real_area, real

    async def read(self, workspace_id: uuid.UUID, path: str, *, max_bytes: int) -> bytes:
        with _os_errors():
            return await asyncio.to_thread(self._read, workspace_id, path, max_bytes)

    def _read(self, workspace_id: uuid.UUID, path: str, max_bytes: int) -> bytes:
        rel, _, real = self._resolve(workspace_id, path)
        # O_NOFOLLOW: the path was just resolved, so a link swapped in since is refused;
        # O_NONBLOCK: opening a FIFO someone left there must not hang the worker.
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(real, flags)
        except FileNotFoundError:
            raise FileMissing(f"no file {rel!r} in this workspace") from None
        except OSError as exc:
            raise PathRefused(f"cannot open {rel!r}: {exc.strerror}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise PathRefused(f"{rel!r} is not a regular file")
        size = info.st_size
        with os.fdopen(fd, "rb") as handle:
            if size > max_bytes:
                raise FileTooLarge(f"{rel!r} is {size} bytes; the limit is {max_bytes}")
            data = handle.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise FileTooLarge(f"{rel!r} is larger than {max_bytes} bytes")
        return data

    async def write(self, workspace_id: uuid.UUID, path: str, data: bytes) -> int:
        with _os_errors():
            return await asyncio.to_thread(self._write, workspace_id, path, data)

    def _write(self, workspace_id: uuid.UUID, path: str, data: bytes) -> int:
        if len(data) > self.max_write_bytes:
            raise FileTooLarge(f"{len(data)} bytes to write; the limit is {self.max_write_bytes}")
        rel, real_area, real = self._resolve(workspace_id, path)
        real_area.mkdir(parents=True, exist_ok=True)
        try:
            real.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise PathRefused(f"a file stands where {rel!r} needs a folder") from None
        if real.is_dir():
            raise PathRefused(f"{rel!r} is a folder, not a file")
        fd, temp = tempfile.mkstemp(dir=real.parent, prefix=TEMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, real)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        return len(data)

    async def exists(self, workspace_id: uuid.UUID, path: str) -> bool:
        _, _, real = self._resolve(workspace_id, path)
        return await asyncio.to_thread(real.is_file)

    async def list_files(self, workspace_id: uuid.UUID, prefix: str = "") -> list[str]:
        return await asyncio.to_thread(self._list, workspace_id, prefix)

    def _list(self, workspace_id: uuid.UUID, prefix: str) -> list[str]:
        area = Path(os.path.realpath(self._area(workspace_id)))
        start = area
        if prefix.strip("/"):
            _, _, start = self._resolve(workspace_id, prefix)
        found: list[str] = []
        # followlinks=False: a linked folder is never walked into.
        for folder, dirs, files in os.walk(start):
            dirs[:] = sorted(d for d in dirs if not d.startswith(TEMP_PREFIX))
            for name in sorted(files):
                full = Path(folder) / name
                if name.startswith(TEMP_PREFIX) or full.is_symlink():
                    continue
                found.append(full.relative_to(area).as_posix())
                if len(found) >= MAX_LIST:
                    return found
        return found


class S3Storage:
    """`s3://<bucket>/<prefix><workspace_id>/<path>` through boto3, run in a thread.
    A PUT is atomic on S3: readers see the old object or the new one, never a mix."""

    def __init__(self, settings: StorageSettings) -> None:
        import boto3
        from botocore.config import Config

        assert settings.s3_bucket is not None  # the settings validator insists
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix
        self.max_write_bytes = settings.max_write_bytes
        key_id, secret = settings.s3_access_key_id, settings.s3_secret_access_key
        self.client: S3Client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=key_id.get_secret_value() if key_id else None,
            aws_secret_access_key=secret.get_secret_value() if secret else None,
            config=Config(
                connect_timeout=settings.s3_timeout_s,
                read_timeout=settings.s3_timeout_s,
                # The node's own retry policy decides about further attempts.
                retries={"max_attempts": 2, "mode": "standard"},
                s3={"addressing_style": settings.s3_addressing_style},
            ),
        )

    def _key(self, workspace_id: uuid.UUID, rel: str) -> str:
        return f"{self.prefix}{uuid.UUID(str(workspace_id))}/{rel}"

    async def read(self, workspace_id: uuid.UUID, path: str, *, max_bytes: int) -> bytes:
        rel = normalise(path)
        return await asyncio.to_thread(self._read, self._key(workspace_id, rel), rel, max_bytes)

    def _read(self, key: str, rel: str, max_bytes: int) -> bytes:
        with _s3_errors(rel):
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            body = response["Body"]
            try:
                size = response.get("ContentLength", 0)
                if size > max_bytes:
                    raise FileTooLarge(f"{rel!r} is {size} bytes; the limit is {max_bytes}")
                data = body.read(max_bytes + 1)
            finally:
                body.close()
        if len(data) > max_bytes:
            raise FileTooLarge(f"{rel!r} is larger than {max_bytes} bytes")
        return data

    async def write(self, workspace_id: uuid.UUID, path: str, data: bytes) -> int:
        rel = normalise(path)
        if len(data) > self.max_write_bytes:
            raise FileTooLarge(f"{len(data)} bytes to write; the limit is {self.max_write_bytes}")
        key = self._key(workspace_id, rel)

        def put() -> None:
            with _s3_errors(rel):
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

        await asyncio.to_thread(put)
        return len(data)

    async def exists(self, workspace_id: uuid.UUID, path: str) -> bool:
        rel = normalise(path)
        key = self._key(workspace_id, rel)

        def head() -> bool:
            try:
                with _s3_errors(rel):
                    self.client.head_object(Bucket=self.bucket, Key=key)
            except FileMissing:
                return False
            return True

        return await asyncio.to_thread(head)

    async def list_files(self, workspace_id: uuid.UUID, prefix: str = "") -> list[str]:
        area = self._key(workspace_id, "")
        start = area + (normalise(prefix) if prefix.strip("/") else "")

        def keys() -> list[str]:
            found: list[str] = []
            with _s3_errors(prefix or "."):
                pages = self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=start
                )
                for page in pages:
                    for item in page.get("Contents", []):
                        found.append(item["Key"].removeprefix(area))
                        if len(found) >= MAX_LIST:
                            return found
            return found

        return await asyncio.to_thread(keys)


@contextlib.contextmanager
def _os_errors() -> Iterator[None]:
    """A disk that is full or a folder we may not write: the operator's to fix, so worth
    another attempt later. The message leaves out the host's own paths."""
    try:
        yield
    except OSError as exc:
        raise StorageUnavailable(f"local storage failed: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _s3_errors(rel: str) -> Iterator[None]:
    """botocore's errors as ours: missing and refused are permanent, the rest transient."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        if code == "NoSuchBucket":
            raise StorageError("the storage bucket does not exist (STORAGE__S3_BUCKET)") from None
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            raise FileMissing(f"no file {rel!r} in this workspace") from None
        if status >= 500 or status == 429 or code in ("SlowDown", "Throttling"):
            raise StorageUnavailable(f"object storage answered {status} {code}") from None
        raise StorageError(f"object storage refused the request: {status} {code}") from None
    except BotoCoreError as exc:
        # Connection, timeout and endpoint errors: the service may come back.
        raise StorageUnavailable(f"object storage unreachable: {type(exc).__name__}") from None


_backends: dict[str, Storage] = {}


def storage_for(settings: Settings) -> Storage:
    """The backend the settings choose, built once per distinct configuration (a boto3
    client is costly to create and safe to share between threads)."""
    config = settings.storage
    # SecretStr dumps as stars: the secrets themselves tell two configurations apart.
    secrets = (config.s3_access_key_id, config.s3_secret_access_key)
    cache_key = config.model_dump_json() + repr(
        [s.get_secret_value() if s else None for s in secrets]
    )
    backend = _backends.get(cache_key)
    if backend is None:
        if config.backend == "s3":
            backend = S3Storage(config)
        else:
            backend = LocalStorage(config.local_root, max_write_bytes=config.max_write_bytes)
        _backends[cache_key] = backend
    return backend
