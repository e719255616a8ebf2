"""Workspace storage: path rules, confinement (symlinks included), size caps and atomic
writes on the local backend; the S3 backend through boto3 against a local S3 server."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr

from backend.config import StorageSettings
from backend.kit.storage import (
    FileMissing,
    FileTooLarge,
    LocalStorage,
    PathRefused,
    S3Storage,
    StorageError,
    StorageUnavailable,
    normalise,
    storage_for,
)
from tests.support.procs import free_port
from tests.support.s3 import S3Server


@pytest.mark.parametrize(
    ("given", "clean"),
    [
        ("a.txt", "a.txt"),
        ("reports/2026/q1.csv", "reports/2026/q1.csv"),
        ("./a//b/./c.txt", "a/b/c.txt"),
        ("  spaced.txt  ", "spaced.txt"),
        ("dir/", "dir"),
    ],
)
def test_paths_are_normalised_to_a_clean_relative_form(given: str, clean: str) -> None:
    assert normalise(given) == clean


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("../secret", "leaves the workspace"),
        ("a/../../etc/passwd", "leaves the workspace"),
        ("a/..", "leaves the workspace"),
        ("/etc/passwd", "absolute"),
        ("C:/Windows/win.ini", "absolute"),
        ("a\\..\\b", "backslash"),
        ("a\x00.txt", "NUL"),
        ("", "empty"),
        ("   ", "empty"),
        (".", "workspace itself"),
        ("x/.tmp-123", "reserved"),
        ("a" * 2000, "longer than"),
    ],
)
def test_paths_that_could_leave_the_workspace_are_refused(given: str, why: str) -> None:
    with pytest.raises(PathRefused, match=why):
        normalise(given)


@pytest.fixture
def local(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "root", max_write_bytes=1000)


async def test_local_write_then_read_lands_in_the_workspace_folder(
    local: LocalStorage, tmp_path: Path
) -> None:
    ws = uuid.uuid4()
    assert await local.write(ws, "out/report.txt", b"hello") == 5
    assert (tmp_path / "root" / str(ws) / "out" / "report.txt").read_bytes() == b"hello"
    assert await local.read(ws, "./out//report.txt", max_bytes=100) == b"hello"
    assert await local.exists(ws, "out/report.txt")
    assert not await local.exists(ws, "out/other.txt")
    assert await local.list_files(ws) == ["out/report.txt"]


async def test_local_workspaces_do_not_see_each_other(local: LocalStorage) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    await local.write(a, "same.txt", b"from a")
    await local.write(b, "same.txt", b"from b")
    assert await local.read(a, "same.txt", max_bytes=100) == b"from a"
    assert await local.read(b, "same.txt", max_bytes=100) == b"from b"
    with pytest.raises(PathRefused):
        await local.read(a, f"../{b}/same.txt", max_bytes=100)


async def test_local_missing_file_and_folder_are_clear_errors(local: LocalStorage) -> None:
    ws = uuid.uuid4()
    with pytest.raises(FileMissing, match=r"no file 'nope\.txt'"):
        await local.read(ws, "nope.txt", max_bytes=100)
    await local.write(ws, "dir/inner.txt", b"x")
    with pytest.raises(PathRefused, match="not a regular file"):
        await local.read(ws, "dir", max_bytes=100)
    with pytest.raises(PathRefused, match="is a folder"):
        await local.write(ws, "dir", b"y")
    with pytest.raises(PathRefused, match="a file stands where"):
        await local.write(ws, "dir/inner.txt/deeper.txt", b"y")


async def test_local_symlinks_leading_outside_are_refused(
    local: LocalStorage, tmp_path: Path
) -> None:
    ws = uuid.uuid4()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"top secret")
    await local.write(ws, "placeholder.txt", b"x")
    area = tmp_path / "root" / str(ws)
    (area / "file_link").symlink_to(outside / "secret.txt")
    (area / "dir_link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathRefused, match="outside the workspace"):
        await local.read(ws, "file_link", max_bytes=100)
    with pytest.raises(PathRefused, match="outside the workspace"):
        await local.read(ws, "dir_link/secret.txt", max_bytes=100)
    with pytest.raises(PathRefused, match="outside the workspace"):
        await local.write(ws, "dir_link/new.txt", b"planted")
    with pytest.raises(PathRefused, match="outside the workspace"):
        await local.write(ws, "file_link", b"overwritten")
    # Nothing outside changed, nothing new appeared there, and links are never listed.
    assert (outside / "secret.txt").read_bytes() == b"top secret"
    assert sorted(os.listdir(outside)) == ["secret.txt"]
    assert await local.list_files(ws) == ["placeholder.txt"]


async def test_local_symlink_inside_the_workspace_is_followed(
    local: LocalStorage, tmp_path: Path
) -> None:
    ws = uuid.uuid4()
    await local.write(ws, "real/data.txt", b"inside")
    area = tmp_path / "root" / str(ws)
    (area / "alias").symlink_to(area / "real", target_is_directory=True)
    assert await local.read(ws, "alias/data.txt", max_bytes=100) == b"inside"


async def test_local_size_caps_refuse_before_touching_the_file(
    local: LocalStorage, tmp_path: Path
) -> None:
    ws = uuid.uuid4()
    with pytest.raises(FileTooLarge, match="limit is 1000"):
        await local.write(ws, "big.bin", b"x" * 1001)
    assert not (tmp_path / "root" / str(ws) / "big.bin").exists()
    await local.write(ws, "ok.bin", b"x" * 1000)
    with pytest.raises(FileTooLarge, match="limit is 999"):
        await local.read(ws, "ok.bin", max_bytes=999)
    assert len(await local.read(ws, "ok.bin", max_bytes=1000)) == 1000


async def test_local_write_is_atomic_readers_see_old_or_new_never_a_mix(
    tmp_path: Path,
) -> None:
    size = 2 * 1024 * 1024
    store = LocalStorage(tmp_path / "root", max_write_bytes=size)
    ws = uuid.uuid4()
    old, new = b"a" * size, b"b" * size
    await store.write(ws, "doc.bin", old)
    seen: set[bytes] = set()
    torn: list[int] = []
    stop = threading.Event()
    target = tmp_path / "root" / str(ws) / "doc.bin"

    def reader() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            if data not in (old, new):
                torn.append(len(data))
            seen.add(data[:1])

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(20):
            await store.write(ws, "doc.bin", new if i % 2 == 0 else old)
    finally:
        stop.set()
        thread.join()
    assert torn == []
    assert seen <= {b"a", b"b"}
    # No temporary file is left behind.
    assert os.listdir(target.parent) == ["doc.bin"]


def test_storage_for_picks_the_backend_from_settings(tmp_path: Path) -> None:
    from backend.config import Settings

    settings = Settings(storage=StorageSettings(local_root=str(tmp_path)))
    chosen = storage_for(settings)
    assert isinstance(chosen, LocalStorage)
    assert chosen.root == tmp_path.resolve()
    assert storage_for(settings) is chosen


def test_s3_settings_need_a_bucket_and_both_keys() -> None:
    with pytest.raises(ValueError, match="STORAGE__S3_BUCKET"):
        StorageSettings(backend="s3")
    with pytest.raises(ValueError, match="go together"):
        StorageSettings(backend="s3", s3_bucket="b", s3_access_key_id=SecretStr("k"))


# S3 ---------------------------------------------------------------------------------------


async def test_s3_write_then_read_under_the_workspace_prefix(s3: S3Server) -> None:
    store = S3Storage(s3.settings(prefix="studio/"))
    ws = uuid.uuid4()
    assert await store.write(ws, "./out//report.txt", b"hello s3") == 8
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket)["Contents"]]
    assert f"studio/{ws}/out/report.txt" in keys
    assert await store.read(ws, "out/report.txt", max_bytes=100) == b"hello s3"
    assert await store.exists(ws, "out/report.txt")
    assert not await store.exists(ws, "out/missing.txt")
    assert await store.list_files(ws) == ["out/report.txt"]
    assert await store.list_files(ws, "out") == ["out/report.txt"]


async def test_s3_workspaces_are_separate_prefixes(s3: S3Server) -> None:
    store = S3Storage(s3.settings())
    a, b = uuid.uuid4(), uuid.uuid4()
    await store.write(a, "same.txt", b"from a")
    await store.write(b, "same.txt", b"from b")
    assert await store.read(a, "same.txt", max_bytes=100) == b"from a"
    assert await store.read(b, "same.txt", max_bytes=100) == b"from b"
    with pytest.raises(PathRefused):
        await store.read(a, f"../{b}/same.txt", max_bytes=100)


async def test_s3_missing_caps_and_refusals(s3: S3Server) -> None:
    store = S3Storage(s3.settings().model_copy(update={"max_write_bytes": 10}))
    ws = uuid.uuid4()
    with pytest.raises(FileMissing, match=r"no file 'nope\.txt'"):
        await store.read(ws, "nope.txt", max_bytes=100)
    with pytest.raises(FileTooLarge):
        await store.write(ws, "big.txt", b"x" * 11)
    await store.write(ws, "ten.txt", b"x" * 10)
    with pytest.raises(FileTooLarge, match="limit is 9"):
        await store.read(ws, "ten.txt", max_bytes=9)
    with pytest.raises(PathRefused):
        await store.write(ws, "/etc/passwd", b"x")


async def test_s3_missing_bucket_is_permanent_and_unreachable_is_transient(
    s3: S3Server,
) -> None:
    missing = S3Storage(s3.settings().model_copy(update={"s3_bucket": "no-such-bucket"}))
    with pytest.raises(StorageError, match="bucket does not exist") as info:
        await missing.read(uuid.uuid4(), "a.txt", max_bytes=10)
    assert not info.value.transient
    down = S3Storage(
        s3.settings().model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{free_port()}"})
    )
    with pytest.raises(StorageUnavailable, match="unreachable") as info2:
        await asyncio.wait_for(down.write(uuid.uuid4(), "a.txt", b"x"), 30)
    assert info2.value.transient
