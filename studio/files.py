"""Workflows as files that live in Git: YAML (`.yaml`/`.yml`) or JSON (`.json`).

A file is the API's export document (what `studio workflows pull` writes):

    format: orchestration-studio.workflow
    format_version: 1
    name: Nightly report
    description: ...
    tags: [reports]
    definition: {nodes: [...], connections: [...], settings: {...}}
    source_workflow_id: <id>       # the workflow it was pulled from; push updates it

or, for hand-written files, the same fields flat: `name`, `nodes`, `connections`,
`settings`, optionally `description`, `tags` and `id` (the workflow to update).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from studio.output import Exit, fail

FORMAT = "orchestration-studio.workflow"
MAX_FILE_BYTES = 5 * 2**20


@dataclass
class WorkflowFile:
    name: str
    description: str
    tags: list[str]
    definition: dict[str, Any]
    workflow_id: str | None
    # The export document as read, when the file is one (imported as such).
    document: dict[str, Any] | None

    def body(self) -> dict[str, Any]:
        """The create/update body of the workflows API."""
        return {
            "name": self.name,
            "description": self.description,
            "tags": self.tags,
            "nodes": self.definition.get("nodes", []),
            "connections": self.definition.get("connections", []),
            "settings": self.definition.get("settings", {}),
        }


def _is_yaml(path: Path) -> bool:
    return path.suffix.lower() in (".yaml", ".yml")


def parse(text: str, *, source: str, as_yaml: bool) -> Any:
    try:
        # safe_load builds plain data only: no Python objects from tags.
        return yaml.safe_load(text) if as_yaml else json.loads(text)
    except (yaml.YAMLError, ValueError) as exc:
        raise fail(
            Exit.USAGE,
            "invalid_file",
            f"{source}: not valid {'YAML' if as_yaml else 'JSON'}: {exc}",
        ) from None


def read(path: Path) -> WorkflowFile:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise fail(Exit.USAGE, "invalid_file", f"{path}: larger than {MAX_FILE_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(Exit.USAGE, "invalid_file", f"cannot read {path}: {exc}") from None
    # JSON is YAML too, but a .json file should be held to JSON.
    raw = parse(text, source=str(path), as_yaml=path.suffix.lower() != ".json")
    return from_data(raw, source=str(path))


def _problem(source: str, field: str, message: str) -> Exception:
    return fail(Exit.USAGE, "invalid_file", f"{source}: {field}: {message}", field=field)


def from_data(raw: Any, *, source: str) -> WorkflowFile:
    if not isinstance(raw, dict):
        raise _problem(source, "(top)", "a workflow file holds a mapping (name, definition ...)")
    document = raw if raw.get("format") == FORMAT else None
    if document is not None:
        definition = raw.get("definition")
        workflow_id = raw.get("source_workflow_id")
    else:
        unknown = set(raw) - {
            "id",
            "name",
            "description",
            "tags",
            "nodes",
            "connections",
            "settings",
        }
        if unknown:
            raise _problem(source, sorted(unknown)[0], "unknown field")
        definition = {k: raw[k] for k in ("nodes", "connections", "settings") if k in raw}
        workflow_id = raw.get("id")
    if not isinstance(definition, dict):
        raise _problem(source, "definition", "must be a mapping of nodes, connections, settings")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _problem(source, "name", "a workflow needs a name")
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise _problem(source, "description", "must be text")
    tags = raw.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise _problem(source, "tags", "must be a list of strings")
    if workflow_id is not None:
        try:
            workflow_id = str(uuid.UUID(str(workflow_id)))
        except ValueError:
            raise _problem(source, "id", "not a workflow id") from None
    return WorkflowFile(
        name=name.strip(),
        description=description,
        tags=tags,
        definition=definition,
        workflow_id=workflow_id,
        document=document,
    )


def dump(document: dict[str, Any], *, as_yaml: bool) -> str:
    if as_yaml:
        return str(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def write(path: Path, document: dict[str, Any]) -> None:
    try:
        path.write_text(dump(document, as_yaml=_is_yaml(path) or path.suffix == ""), "utf-8")
    except OSError as exc:
        raise fail(Exit.USAGE, "cannot_write", f"cannot write {path}: {exc}") from None


def check(workflow: WorkflowFile) -> list[dict[str, Any]]:
    """The problems the engine's own validator finds in the definition, offline.
    References to agents, credentials and other workflows are taken as given here:
    the server checks them against the workspace on push."""
    from backend.workflows.graph import Context, GraphInvalid, validate

    ids = _uuids(workflow.definition)
    context = Context(
        workflow_ids=frozenset(ids), agent_ids=frozenset(ids), credential_ids=frozenset(ids)
    )
    try:
        validate(workflow.definition, context)
    except GraphInvalid as exc:
        return [p.as_dict() for p in exc.problems]
    return []


def _uuids(value: Any) -> set[uuid.UUID]:
    found: set[uuid.UUID] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and len(item) == 36:
            with contextlib.suppress(ValueError):
                found.add(uuid.UUID(item))
    return found
