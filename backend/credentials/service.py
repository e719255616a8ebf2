"""Credentials: encrypted with the settings' key (MultiFernet, so old keys still
decrypt), bound to their row, never returned. `rotate_all` re-encrypts every row under
the newest key; run it with `python -m backend.credentials.rotate` after adding a key."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.activity.service import record
from backend.auth.dependencies import WorkspaceAccess
from backend.config import Settings
from backend.credentials.schemas import CredentialCreate, CredentialUpdate, Secret
from backend.kit.crypto import SecretBox
from backend.kit.db import UnitOfWork
from backend.kit.errors import Conflict
from backend.kit.repository import Repository
from backend.models import Credential
from backend.workflows.service import workflows_using_credential


class CredentialRepository(Repository[Credential]):
    model = Credential


def _plain(secret: Secret) -> dict[str, Any]:
    def reveal(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        if isinstance(value, dict):
            return {k: reveal(v) for k, v in value.items()}
        return value

    return {name: reveal(getattr(secret, name)) for name in type(secret).model_fields}


def _hint(data: dict[str, Any]) -> str | None:
    """The last four characters of the main secret, enough to tell two apart."""
    # Never from a password: its tail narrows a guess and tells people nothing useful.
    main = data.get("key") or data.get("token")
    if isinstance(main, str) and len(main) >= 12:
        return "…" + main[-4:]
    return None


def _seal(box: SecretBox, credential: Credential, data: dict[str, Any]) -> str:
    # The row's identity goes inside the ciphertext: pasted into another row (or
    # another workspace) it no longer opens.
    return box.seal(
        json.dumps(
            {"id": str(credential.id), "workspace_id": str(credential.workspace_id), "data": data}
        )
    )


def reveal(settings: Settings, credential: Credential) -> dict[str, Any]:
    """The secret fields, for the engine's node handlers only; never for a response."""
    payload = json.loads(SecretBox(settings).open(credential.secret_encrypted))
    if payload.get("id") != str(credential.id) or payload.get("workspace_id") != str(
        credential.workspace_id
    ):
        raise ValueError("credential ciphertext does not belong to this row")
    data: dict[str, Any] = payload["data"]
    return data


async def create(
    uow: UnitOfWork, settings: Settings, access: WorkspaceAccess, data: CredentialCreate
) -> Credential:
    session = uow.session
    duplicate = await session.scalar(
        select(Credential.id).where(
            Credential.workspace_id == access.workspace.id, Credential.name == data.name
        )
    )
    if duplicate is not None:
        raise Conflict(f"a credential named {data.name!r} exists", field="name")
    secret = _plain(data.secret)
    credential = Credential(
        id=uuid.uuid4(), workspace_id=access.workspace.id, name=data.name, type=data.secret.type,
        hint=_hint(secret), created_by=access.user.id, secret_encrypted="",
    )  # fmt: skip
    credential.secret_encrypted = _seal(SecretBox(settings), credential, secret)
    session.add(credential)
    await session.flush()
    record(
        session,
        access.principal,
        workspace_id=access.workspace.id,
        action="credential.create",
        resource_type="credential",
        resource_id=credential.id,
        details={"name": data.name, "type": credential.type},
    )
    return credential


async def list_credentials(
    uow: UnitOfWork, access: WorkspaceAccess, *, limit: int, offset: int
) -> tuple[Sequence[Credential], int]:
    stmt = (
        select(Credential)
        .where(Credential.workspace_id == access.workspace.id)
        .order_by(Credential.name, Credential.id)
    )
    return await CredentialRepository(uow.session).paginate(stmt, limit=limit, offset=offset)


async def update(
    uow: UnitOfWork, settings: Settings, access: WorkspaceAccess, data: CredentialUpdate
) -> Credential:
    credential: Credential = access.resource
    changed = []
    if data.name is not None and data.name != credential.name:
        clash = await uow.session.scalar(
            select(Credential.id).where(
                Credential.workspace_id == credential.workspace_id, Credential.name == data.name
            )
        )
        if clash is not None:
            raise Conflict(f"a credential named {data.name!r} exists", field="name")
        credential.name = data.name
        changed.append("name")
    if data.secret is not None:
        secret = _plain(data.secret)
        credential.type = data.secret.type
        credential.hint = _hint(secret)
        credential.secret_encrypted = _seal(SecretBox(settings), credential, secret)
        changed.append("secret")
    if changed:
        await uow.session.flush()
        record(
            uow.session,
            access.principal,
            workspace_id=credential.workspace_id,
            action="credential.update",
            resource_type="credential",
            resource_id=credential.id,
            details={"fields": changed},
        )
    return credential


async def delete(uow: UnitOfWork, access: WorkspaceAccess) -> None:
    credential: Credential = access.resource
    users = await workflows_using_credential(uow.session, credential.workspace_id, credential.id)
    if users:
        raise Conflict(
            f"published workflows use this credential: {', '.join(users)}", workflows=users
        )
    record(
        uow.session,
        access.principal,
        workspace_id=credential.workspace_id,
        action="credential.delete",
        resource_type="credential",
        resource_id=credential.id,
        details={"name": credential.name},
    )
    await uow.session.delete(credential)
    await uow.session.flush()


async def rotate_all(session: AsyncSession, settings: Settings, *, batch: int = 500) -> int:
    """Re-encrypt every credential under the newest key. Safe to run again."""
    box = SecretBox(settings)
    done = 0
    last: uuid.UUID | None = None
    while True:
        stmt = select(Credential).order_by(Credential.id).limit(batch).with_for_update()
        if last is not None:
            stmt = stmt.where(Credential.id > last)
        rows = (await session.scalars(stmt)).all()
        if not rows:
            return done
        for credential in rows:
            credential.secret_encrypted = box.rotate(credential.secret_encrypted)
            done += 1
        last = rows[-1].id
        await session.flush()


def touch(credential: Credential) -> None:
    """Mark a credential used (shown in its metadata), within the caller's transaction."""
    credential.last_used_at = datetime.now(UTC)
