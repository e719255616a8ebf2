"""file_write and file_read nodes in real runs through the engine's runner (real
PostgreSQL), on local storage in a temporary folder and on a local S3 server."""

from __future__ import annotations

import base64
import glob
import itertools
import json
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.kit.http_guard import guarded_client
from backend.models import Workspace
from tests.support.engine import Enqueued, error_of, node_settings, start, state
from tests.support.s3 import S3Server
from workers.engine.runner import Runner


def trig() -> dict[str, Any]:
    return {"id": "start", "type": "trigger", "config": {"kind": "manual"}}


def workflow(*nodes: dict[str, Any]) -> dict[str, Any]:
    """start -> nodes[0] -> nodes[1] -> ..."""
    ids = ["start", *(n["id"] for n in nodes)]
    return {
        "nodes": [trig(), *nodes],
        "connections": [{"source": a, "target": b} for a, b in itertools.pairwise(ids)],
    }


def write(node_id: str, path: str, content: str, **extra: Any) -> dict[str, Any]:
    config = {"kind": "file_write", "path": path, "content": content, **extra}
    return {"id": node_id, "type": "action", "config": config}


def read(node_id: str, path: str, **extra: Any) -> dict[str, Any]:
    config = {"kind": "file_read", "path": path, **extra}
    return {"id": node_id, "type": "action", "config": config}


async def test_file_write_then_file_read_with_templates(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    storage_root: Path,
) -> None:
    d = workflow(
        write(
            "save",
            "reports/{{ trigger.name }}.txt",
            "Hello {{ trigger.who }}, total {{ trigger.n * 2 }}",
        ),
        read("load", "{{ nodes.save.output.path }}"),
    )
    execution_id = await start(maker, workspace, d, {"name": "q1", "who": "Zoë", "n": 21})
    assert await runner.execute(execution_id) == "completed"
    ex, rows = await state(maker, execution_id)
    text = "Hello Zoë, total 42"
    assert rows["save"].output == {"path": "reports/q1.txt", "size": len(text.encode())}
    assert rows["load"].output == {
        "path": "reports/q1.txt",
        "size": len(text.encode()),
        "content_type": "text/plain",
        "content": text,
        "encoding": "utf-8",
    }
    # On disk in this workspace's own folder, nowhere else.
    assert (storage_root / str(workspace.id) / "reports" / "q1.txt").read_text() == text
    assert ex.status == "completed"


async def test_json_written_with_tojson_reads_back_parsed(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace
) -> None:
    d = workflow(
        write("save", "data/items.json", "{{ trigger.rows | tojson }}"),
        read("load", "data/items.json", parse_json=True),
    )
    items = [{"id": 1, "tags": ["a"]}, {"id": 2, "tags": []}]
    execution_id = await start(maker, workspace, d, {"rows": items})
    assert await runner.execute(execution_id) == "completed"
    _, rows = await state(maker, execution_id)
    assert rows["load"].output["content"] == items
    assert rows["load"].output["encoding"] == "json"
    assert rows["load"].output["content_type"] == "application/json"


async def test_binary_content_round_trips_as_base64(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    storage_root: Path,
) -> None:
    raw = bytes(range(256))
    d = workflow(
        write("save", "img/blob.bin", "{{ trigger.data }}", encoding="base64"),
        read("load", "img/blob.bin"),
        write("copy", "img/copy.bin", "{{ nodes.load.output.content }}", encoding="base64"),
    )
    execution_id = await start(maker, workspace, d, {"data": base64.b64encode(raw).decode()})
    assert await runner.execute(execution_id) == "completed"
    _, rows = await state(maker, execution_id)
    assert rows["load"].output["encoding"] == "base64"
    assert base64.b64decode(rows["load"].output["content"]) == raw
    assert (storage_root / str(workspace.id) / "img" / "copy.bin").read_bytes() == raw


async def test_a_path_leaving_the_workspace_fails_the_node_permanently(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    storage_root: Path,
) -> None:
    d = workflow(
        write(
            "escape",
            "../{{ trigger.victim }}/planted.txt",
            "x",
        )
    )
    d["nodes"][1]["retry"] = {"max_retries": 3, "backoff_s": [0.01]}
    execution_id = await start(maker, workspace, d, {"victim": "other"})
    assert await runner.execute(execution_id) == "failed"
    ex, rows = await state(maker, execution_id)
    assert rows["escape"].status == "failed"
    # Permanent: the retry policy was never consulted.
    assert rows["escape"].attempt == 1
    assert error_of(rows["escape"])["class"] == "permanent"
    assert "leaves the workspace" in error_of(rows["escape"])["message"]
    assert ex.status == "failed"
    assert glob.glob(f"{storage_root.parent}/**/planted.txt", recursive=True) == []


async def test_an_upload_is_not_written_over_by_path(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    storage_root: Path,
) -> None:
    """`.uploads/<id>` holds an upload whose record (size, hash, sniffed type) describes
    its bytes; written by path the record went stale and the download refused the file."""
    d = workflow(write("over", ".uploads/{{ trigger.id }}", "<html>"))
    execution_id = await start(maker, workspace, d, {"id": str(uuid.uuid4())})
    assert await runner.execute(execution_id) == "failed"
    _, rows = await state(maker, execution_id)
    assert error_of(rows["over"])["class"] == "permanent"
    assert "write one with file_id" in error_of(rows["over"])["message"]
    assert not (storage_root / str(workspace.id) / ".uploads").exists()


async def test_reading_a_symlink_out_of_the_workspace_fails_permanently(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    storage_root: Path,
    tmp_path: Path,
) -> None:
    (tmp_path / "host_secret.txt").write_text("do not read")
    area = storage_root / str(workspace.id)
    area.mkdir(parents=True)
    (area / "innocent.txt").symlink_to(tmp_path / "host_secret.txt")
    execution_id = await start(maker, workspace, workflow(read("load", "innocent.txt")))
    assert await runner.execute(execution_id) == "failed"
    _, rows = await state(maker, execution_id)
    assert error_of(rows["load"])["class"] == "permanent"
    assert "outside the workspace" in error_of(rows["load"])["message"]
    assert "do not read" not in json.dumps(rows["load"].output)


async def test_a_missing_file_and_an_oversized_write_fail_clearly(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace
) -> None:
    execution_id = await start(
        maker, workspace, workflow(read("load", "nope/{{ trigger.f }}")), {"f": "x.txt"}
    )
    assert await runner.execute(execution_id) == "failed"
    _, rows = await state(maker, execution_id)
    assert rows["load"].error == {
        "message": "no file 'nope/x.txt' in this workspace",
        "class": "permanent",
        "attempt": 1,
    }
    small = Runner(
        runner.settings.model_copy(
            update={"storage": runner.settings.storage.model_copy(update={"max_write_bytes": 8})}
        ),
        maker,
        runner.http,
        f"test-{uuid.uuid4().hex[:6]}",
        Enqueued(),
    )
    execution_id = await start(maker, workspace, workflow(write("save", "a.txt", "123456789")))
    assert await small.execute(execution_id) == "failed"
    _, rows = await state(maker, execution_id)
    assert "limit is 8" in error_of(rows["save"])["message"]


async def test_file_nodes_on_s3_storage(
    settings: Settings,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    s3: S3Server,
) -> None:
    s3_settings = node_settings(settings, s3.settings(prefix="runs/"))
    async with guarded_client(["127.0.0.1/32"]) as http:
        runner = Runner(s3_settings, maker, http, f"test-{uuid.uuid4().hex[:6]}", Enqueued())
        d = workflow(
            write("save", "out/{{ trigger.k }}.txt", "on s3: {{ trigger.k }}"),
            read("load", "out/{{ trigger.k }}.txt"),
        )
        execution_id = await start(maker, workspace, d, {"k": "abc"})
        assert await runner.execute(execution_id) == "completed"
    _, rows = await state(maker, execution_id)
    assert rows["load"].output["content"] == "on s3: abc"
    stored = s3.client().get_object(Bucket=s3.bucket, Key=f"runs/{workspace.id}/out/abc.txt")
    assert stored["Body"].read() == b"on s3: abc"
