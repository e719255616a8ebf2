"""`studio admin`: bootstrap for automation without a mailbox. Runs where the database
is (it talks to PostgreSQL, not to the API) and goes through the same services the API
uses, so a key made here is exactly a key made by `POST /workspaces/{id}/api-keys`:
hashed at rest, bound to one workspace, capped by its creator's role, and recorded in
the activity log."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

from studio.output import Exit, fail

DEFAULT_EMAIL = "admin@example.com"


@dataclass
class NewKey:
    key: str
    id: str
    name: str
    role: str
    workspace_id: str
    workspace_name: str
    created_by: str
    created_user: bool
    expires_at: str | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


async def _create(
    *,
    workspace_id: uuid.UUID | None,
    email: str | None,
    role: str,
    name: str,
    expires_in_days: int | None,
) -> NewKey:
    # Imported here: the rest of the CLI needs no database driver or settings.
    from sqlalchemy import func, select

    from backend.auth.dependencies import Principal, WorkspaceAccess
    from backend.auth.permissions import Role
    from backend.auth.schemas import ApiKeyCreate
    from backend.auth.service import create_api_key
    from backend.config import get_settings
    from backend.kit.db import UnitOfWork, create_engine, create_sessionmaker
    from backend.models import User, Workspace, WorkspaceMember
    from backend.workspaces.service import create_personal_workspace

    try:
        data = ApiKeyCreate(name=name, role=Role(role), expires_in_days=expires_in_days)
    except ValueError as exc:
        raise fail(Exit.USAGE, "validation_error", str(exc).splitlines()[0]) from None
    engine = create_engine(get_settings())
    try:
        async with UnitOfWork(create_sessionmaker(engine)) as uow:
            session = uow.session
            created_user = False
            user: User | None = None
            if email is not None:
                email = email.strip().lower()
                user = await session.scalar(select(User).where(User.email == email))
            if workspace_id is None and user is None:
                if email is None and await session.scalar(select(func.count(User.id))) == 0:
                    email = DEFAULT_EMAIL
                if email is not None:
                    # The first user (or the one named): signing in later with this
                    # address reaches the same account and workspace.
                    user = User(email=email)
                    session.add(user)
                    await session.flush()
                    await create_personal_workspace(session, user)
                    created_user = True
            if workspace_id is None:
                query = select(WorkspaceMember.workspace_id).order_by(WorkspaceMember.created_at)
                if user is not None:
                    query = query.where(
                        WorkspaceMember.user_id == user.id,
                        WorkspaceMember.role == Role.OWNER.value,
                    )
                candidates = list(dict.fromkeys((await session.scalars(query)).all()))
                if len(candidates) != 1:
                    listed = ", ".join(str(c) for c in candidates[:10])
                    raise fail(
                        Exit.USAGE,
                        "ambiguous_workspace",
                        f"{len(candidates)} workspaces could be meant: pass --workspace ID"
                        + (f" (one of: {listed})" if listed else ""),
                        field="workspace",
                    )
                workspace_id = candidates[0]
            workspace = await session.get(Workspace, workspace_id)
            if workspace is None:
                raise fail(
                    Exit.NOT_FOUND,
                    "not_found",
                    f"workspace {workspace_id} not found",
                    field="workspace",
                )
            # The key acts for a member of the workspace: the named user, else its
            # longest-standing owner.
            member_query = (
                select(WorkspaceMember)
                .where(WorkspaceMember.workspace_id == workspace.id)
                .order_by(WorkspaceMember.created_at)
            )
            if user is not None:
                member_query = member_query.where(WorkspaceMember.user_id == user.id)
            else:
                member_query = member_query.where(WorkspaceMember.role == Role.OWNER.value)
            member = await session.scalar(member_query.limit(1))
            if member is None:
                who = f"{email} is not a member" if user is not None else "it has no owner"
                raise fail(
                    Exit.USAGE,
                    "no_member",
                    f"cannot make a key for workspace {workspace.id}: {who}",
                    field="email" if user is not None else "workspace",
                )
            creator = user or await session.get(User, member.user_id)
            assert creator is not None
            access = WorkspaceAccess(
                principal=Principal(user=creator),
                workspace=workspace,
                role=Role(member.role),
            )
            try:
                api_key, key = await create_api_key(uow, access, data)
            except Exception as exc:
                code = getattr(exc, "code", None)
                if code == "permission_denied":
                    raise fail(Exit.AUTH, code, str(exc), field="role") from None
                raise
            return NewKey(
                key=key,
                id=str(api_key.id),
                name=api_key.name,
                role=api_key.role,
                workspace_id=str(workspace.id),
                workspace_name=workspace.name,
                created_by=creator.email,
                created_user=created_user,
                expires_at=api_key.expires_at.isoformat() if api_key.expires_at else None,
            )
    finally:
        await engine.dispose()


def create_key(
    *,
    workspace_id: uuid.UUID | None,
    email: str | None,
    role: str,
    name: str,
    expires_in_days: int | None,
) -> NewKey:
    return asyncio.run(
        _create(
            workspace_id=workspace_id,
            email=email,
            role=role,
            name=name,
            expires_in_days=expires_in_days,
        )
    )
