"""Users, workspaces, memberships and signed-in tokens, made straight in the test's
database session (flush, never commit: the test's transaction is rolled back)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth import tokens
from backend.auth.permissions import Role
from backend.config import Settings
from backend.kit.crypto import hash_token
from backend.models import AuthSession, User, Workspace
from tests.support.factories import (
    UserFactory,
    WorkspaceFactory,
    WorkspaceMemberFactory,
    create,
    unique_email,
)

__all__ = [
    "Actor",
    "add_member",
    "make_user",
    "make_workspace",
    "member",
    "sign_in",
    "unique_email",
]


@dataclass
class Actor:
    user: User
    session_id: uuid.UUID
    access_token: str
    refresh_token: str
    headers: dict[str, str] = field(default_factory=dict)


async def make_user(session: AsyncSession, email: str | None = None) -> User:
    return await create(session, UserFactory, email=(email or unique_email()).lower())


async def sign_in(session: AsyncSession, settings: Settings, user: User) -> Actor:
    auth_session = AuthSession(
        id=uuid.uuid4(),
        user_id=user.id,
        refresh_token_hash="",
        expires_at=datetime.now(UTC) + timedelta(days=1),
    )
    refresh = tokens.issue(settings, user_id=user.id, session_id=auth_session.id, type_="refresh")
    auth_session.refresh_token_hash = hash_token(refresh)
    session.add(auth_session)
    await session.flush()
    access = tokens.issue(settings, user_id=user.id, session_id=auth_session.id, type_="access")
    return Actor(user, auth_session.id, access, refresh, {"Authorization": f"Bearer {access}"})


async def make_workspace(session: AsyncSession, name: str = "Team") -> Workspace:
    return await create(session, WorkspaceFactory, name=name)


async def add_member(session: AsyncSession, workspace: Workspace, user: User, role: Role) -> None:
    await create(
        session, WorkspaceMemberFactory, workspace_id=workspace.id, user_id=user.id, role=role.value
    )


async def member(
    session: AsyncSession, settings: Settings, workspace: Workspace, role: Role
) -> Actor:
    user = await make_user(session, unique_email(role.value))
    await add_member(session, workspace, user, role)
    return await sign_in(session, settings, user)
