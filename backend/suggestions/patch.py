"""A suggestion's patch: a short list of operations on a workflow definition, applied to a
copy of the version the suggestion was made for. Pure.

Operations (`op`):
- `set_node_field` {node_id, field, value}: set a field of a node, `field` a dotted path
  (`retry`, `timeout_s`, `config.model`); a null value removes the field;
- `remove_node` {node_id}: the node and every connection touching it;
- `add_node` {node}: a whole node;
- `add_connection` / `remove_connection` {source, target, branch};
- `set_setting` {field, value}: a workflow setting (dotted path); null removes it.

Operations only say what changes; whether the result is a valid workflow is the
validator's to say, when the patch is proposed and again when it is accepted.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

# A dotted path of plain names: no way to address anything but nested object keys.
NAME = r"[A-Za-z_][A-Za-z0-9_]*"
FieldPath = Annotated[
    str, Field(min_length=1, max_length=200, pattern=rf"^{NAME}(\.{NAME}){{0,7}}$")
]
NodeRef = Annotated[str, Field(min_length=1, max_length=64)]
# Node fields a patch may not set: they are what connections and the catalogue key on.
FIXED_FIELDS = ("id",)


class _Op(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SetNodeField(_Op):
    op: Literal["set_node_field"]
    node_id: NodeRef
    field: FieldPath
    value: Any = None


class RemoveNode(_Op):
    op: Literal["remove_node"]
    node_id: NodeRef


class AddNode(_Op):
    op: Literal["add_node"]
    node: dict[str, Any]


class AddConnection(_Op):
    op: Literal["add_connection"]
    source: NodeRef
    target: NodeRef
    branch: str | None = Field(default=None, max_length=64)


class RemoveConnection(_Op):
    op: Literal["remove_connection"]
    source: NodeRef
    target: NodeRef
    branch: str | None = Field(default=None, max_length=64)


class SetSetting(_Op):
    op: Literal["set_setting"]
    field: FieldPath
    value: Any = None


Operation = Annotated[
    SetNodeField | RemoveNode | AddNode | AddConnection | RemoveConnection | SetSetting,
    Field(discriminator="op"),
]
OPERATIONS = TypeAdapter(list[Operation])
MAX_OPERATIONS = 100


class PatchError(ValueError):
    """The patch cannot be applied to this definition (`index`: the operation at fault)."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message if index is None else f"operation {index}: {message}")
        self.index = index


def parse(ops: Any) -> list[Any]:
    if not isinstance(ops, list) or len(ops) > MAX_OPERATIONS:
        raise PatchError(f"a patch is a list of at most {MAX_OPERATIONS} operations")
    try:
        return OPERATIONS.validate_python(ops)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = first["loc"]
        index = loc[0] if loc and isinstance(loc[0], int) else None
        where = ".".join(str(p) for p in loc[1:] if not isinstance(p, int))
        raise PatchError(f"{where + ': ' if where else ''}{first['msg']}", index) from exc


def _set_path(target: dict[str, Any], path: str, value: Any, index: int) -> None:
    keys = path.split(".")
    here = target
    for key in keys[:-1]:
        nxt = here.get(key)
        if nxt is None:
            if value is None:
                return
            nxt = here[key] = {}
        if not isinstance(nxt, dict):
            raise PatchError(f"{path}: {key} is not an object", index)
        here = nxt
    if value is None:
        here.pop(keys[-1], None)
    else:
        here[keys[-1]] = copy.deepcopy(value)


def _same_edge(conn: Any, source: str, target: str, branch: str | None) -> bool:
    return (
        isinstance(conn, dict)
        and conn.get("source") == source
        and conn.get("target") == target
        and conn.get("branch") == branch
    )


def apply(definition: dict[str, Any], ops: Any) -> dict[str, Any]:
    """A patched copy of `definition`; PatchError when an operation does not fit it."""
    parsed = parse(ops)
    out: dict[str, Any] = {
        "nodes": copy.deepcopy(list(definition.get("nodes") or [])),
        "connections": copy.deepcopy(list(definition.get("connections") or [])),
        "settings": copy.deepcopy(dict(definition.get("settings") or {})),
    }
    nodes: list[Any] = out["nodes"]
    for index, op in enumerate(parsed):
        by_id = {n.get("id"): n for n in nodes if isinstance(n, dict)}
        if isinstance(op, SetNodeField):
            node = by_id.get(op.node_id)
            if node is None:
                raise PatchError(f"no node {op.node_id!r}", index)
            if op.field.split(".")[0] in FIXED_FIELDS:
                raise PatchError(f"{op.field}: a node's id cannot be patched", index)
            _set_path(node, op.field, op.value, index)
        elif isinstance(op, RemoveNode):
            if op.node_id not in by_id:
                raise PatchError(f"no node {op.node_id!r}", index)
            nodes[:] = [n for n in nodes if not (isinstance(n, dict) and n.get("id") == op.node_id)]
            out["connections"] = [
                c
                for c in out["connections"]
                if not (isinstance(c, dict) and op.node_id in (c.get("source"), c.get("target")))
            ]
        elif isinstance(op, AddNode):
            node_id = op.node.get("id")
            if not isinstance(node_id, str):
                raise PatchError("node.id: a node needs a string id", index)
            if node_id in by_id:
                raise PatchError(f"node {node_id!r} already exists", index)
            nodes.append(copy.deepcopy(op.node))
        elif isinstance(op, AddConnection):
            if any(_same_edge(c, op.source, op.target, op.branch) for c in out["connections"]):
                raise PatchError(f"connection {op.source} -> {op.target} already exists", index)
            edge: dict[str, Any] = {"source": op.source, "target": op.target}
            if op.branch is not None:
                edge["branch"] = op.branch
            out["connections"].append(edge)
        elif isinstance(op, RemoveConnection):
            kept = [
                c for c in out["connections"] if not _same_edge(c, op.source, op.target, op.branch)
            ]
            if len(kept) == len(out["connections"]):
                raise PatchError(f"no connection {op.source} -> {op.target}", index)
            out["connections"] = kept
        else:
            assert isinstance(op, SetSetting)
            _set_path(out["settings"], op.field, op.value, index)
    return out


def unreachable(definition: dict[str, Any], *, ignore_branches: Iterable[str] = ()) -> list[str]:
    """Ids of the nodes no trigger reaches (following connections, except those whose
    branch is in `ignore_branches`), in definition order."""
    skip = set(ignore_branches)
    nodes = [n for n in definition.get("nodes") or [] if isinstance(n, dict)]
    outgoing: dict[Any, list[Any]] = {}
    for c in definition.get("connections") or []:
        if isinstance(c, dict) and c.get("branch") not in skip:
            outgoing.setdefault(c.get("source"), []).append(c.get("target"))
    seen = {n.get("id") for n in nodes if n.get("type") == "trigger"}
    todo = list(seen)
    while todo:
        for target in outgoing.get(todo.pop(), []):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return [str(n.get("id")) for n in nodes if n.get("id") not in seen]
