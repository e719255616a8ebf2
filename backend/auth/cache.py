"""A short-lived, per-process cache of who a credential belongs to and what role they
hold in a workspace, so an authenticated request does not pay four round trips
(session, user, membership, workspace) before it does its own work.

The bound is the point: an entry lives at most `auth.principal_cache_ttl_s` seconds
(validated to be <= 5 s, default 2 s). So a revoked session, a revoked or expired API
key, a disabled account, a removed member or a lowered role stops working everywhere
within that time, in every API process, with no message between them. Changes made
through this process's ORM sessions (sign-out, key revocation, member removal or role
change) evict the entries they touch at once, so the process that made the change never
answers from the old state; absolute expiries (the session's, the key's) are checked on
every hit.

Entries are plain values (column dicts), never live ORM objects: each hit builds fresh
detached copies and attaches them to the request's session without a query, so no
object is ever shared between two requests.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import event, inspect
from sqlalchemy.orm import Session, make_transient_to_detached

from backend.models import ApiKey, AuthSession, User, Workspace, WorkspaceMember
from backend.models.base import Base

M = TypeVar("M", bound=Base)

# A bound on memory, not on correctness: past it the oldest entries are dropped.
MAX_ENTRIES = 20_000


def values_of(obj: Base) -> dict[str, Any]:
    """The loaded column values of a row, to rebuild it later without a query."""
    return {attr.key: getattr(obj, attr.key) for attr in inspect(type(obj)).column_attrs}


def attach(session: Session, model: type[M], values: dict[str, Any]) -> M:
    """A persistent `model` row in `session` built from cached values, without a query
    (the session's own copy if it already holds that row)."""
    key = session.identity_key(model, values["id"])
    existing = session.identity_map.get(key)
    if existing is not None:
        return existing  # type: ignore[no-any-return]
    obj = model(**values)
    make_transient_to_detached(obj)
    session.add(obj)
    return obj


@dataclass(frozen=True, slots=True)
class CachedPrincipal:
    user: dict[str, Any]
    session_id: uuid.UUID | None
    api_key: dict[str, Any] | None
    # The credential's own end (session or key expiry), checked on every hit.
    expires_at: datetime | None

    @property
    def user_id(self) -> uuid.UUID:
        user_id: uuid.UUID = self.user["id"]
        return user_id


@dataclass(frozen=True, slots=True)
class CachedGrant:
    role: str
    workspace: dict[str, Any]


class PrincipalCache:
    def __init__(self) -> None:
        # key -> (monotonic deadline, value); dicts keep insertion order, so the first
        # key is the oldest when trimming.
        self._principals: dict[str, tuple[float, CachedPrincipal]] = {}
        self._grants: dict[tuple[uuid.UUID, uuid.UUID], tuple[float, CachedGrant]] = {}

    def principal(self, key: str) -> CachedPrincipal | None:
        entry = self._principals.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            self._principals.pop(key, None)
            return None
        return entry[1]

    def put_principal(self, key: str, value: CachedPrincipal, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        _trim(self._principals)
        self._principals[key] = (time.monotonic() + ttl_s, value)

    def grant(self, user_id: uuid.UUID, workspace_id: uuid.UUID) -> CachedGrant | None:
        entry = self._grants.get((user_id, workspace_id))
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            self._grants.pop((user_id, workspace_id), None)
            return None
        return entry[1]

    def put_grant(
        self, user_id: uuid.UUID, workspace_id: uuid.UUID, value: CachedGrant, ttl_s: float
    ) -> None:
        if ttl_s <= 0:
            return
        _trim(self._grants)
        self._grants[(user_id, workspace_id)] = (time.monotonic() + ttl_s, value)

    def evict(
        self,
        *,
        users: Collection[uuid.UUID] = (),
        sessions: Collection[uuid.UUID] = (),
        keys: Collection[uuid.UUID] = (),
        workspaces: Collection[uuid.UUID] = (),
    ) -> None:
        if users or sessions or keys:
            for name, (_, p) in list(self._principals.items()):
                if (
                    p.user_id in users
                    or p.session_id in sessions
                    or (p.api_key is not None and p.api_key["id"] in keys)
                ):
                    self._principals.pop(name, None)
        if users or workspaces:
            for pair in list(self._grants):
                if pair[0] in users or pair[1] in workspaces:
                    self._grants.pop(pair, None)

    def clear(self) -> None:
        self._principals.clear()
        self._grants.clear()


def _trim(entries: dict[Any, tuple[float, Any]]) -> None:
    if len(entries) < MAX_ENTRIES:
        return
    now = time.monotonic()
    for name in [k for k, (deadline, _) in entries.items() if deadline <= now]:
        entries.pop(name, None)
    while len(entries) >= MAX_ENTRIES:
        entries.pop(next(iter(entries)))


# One per process: the ORM hooks below reach it from any session.
cache = PrincipalCache()

_TOUCHED = "auth_cache_touched"


@event.listens_for(Session, "after_flush")
def _note_identity_changes(session: Session, _: Any) -> None:
    """Evict what a flush changed about identity, and again after the commit (a request
    that re-cached the old row in between must not keep it)."""
    users: set[uuid.UUID] = set()
    sessions: set[uuid.UUID] = set()
    keys: set[uuid.UUID] = set()
    workspaces: set[uuid.UUID] = set()
    deleted = session.deleted
    for obj in (*session.dirty, *deleted):
        if isinstance(obj, User):
            users.add(obj.id)
        elif isinstance(obj, AuthSession):
            if obj in deleted or not _only_stamped(obj, "last_activity_at"):
                sessions.add(obj.id)
        elif isinstance(obj, ApiKey):
            if obj in deleted or not _only_stamped(obj, "last_used_at"):
                keys.add(obj.id)
        elif isinstance(obj, WorkspaceMember):
            # A removed member's keys are revoked with a bulk UPDATE: evicting the
            # person evicts their keys' entries too.
            users.add(obj.user_id)
        elif isinstance(obj, Workspace):
            workspaces.add(obj.id)
    if users or sessions or keys or workspaces:
        cache.evict(users=users, sessions=sessions, keys=keys, workspaces=workspaces)
        pending = session.info.setdefault(_TOUCHED, [])
        pending.append((users, sessions, keys, workspaces))


def _only_stamped(obj: Base, stamp: str) -> bool:
    """Whether the flush changes nothing of `obj` but its activity stamp (written once a
    minute by the request that finds it stale, right after it cached the credential:
    evicting for it only made that caller's next request miss). In after_flush the
    attributes still carry their history."""
    changed = {attr.key for attr in inspect(obj).attrs if attr.history.has_changes()}
    return changed <= {stamp}


@event.listens_for(Session, "after_commit")
def _evict_committed(session: Session) -> None:
    for users, sessions, keys, workspaces in session.info.pop(_TOUCHED, ()):
        cache.evict(users=users, sessions=sessions, keys=keys, workspaces=workspaces)


@event.listens_for(Session, "after_rollback")
def _forget(session: Session) -> None:
    session.info.pop(_TOUCHED, None)
