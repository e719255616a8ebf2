"""Principal.user and WorkspaceAccess.workspace are built from the principal cache only
when a route asks for them (issue 20): the ids are there at once, the rows once."""

from __future__ import annotations

import uuid

from backend.auth.dependencies import Principal, WorkspaceAccess
from backend.auth.permissions import Role
from backend.models import User, Workspace


def test_the_user_row_is_built_once_and_only_when_asked() -> None:
    user = User(id=uuid.uuid4(), email="lazy@example.com")
    built: list[User] = []

    def load() -> User:
        built.append(user)
        return user

    principal = Principal(user_id=user.id, load_user=load, session_id=uuid.uuid4())
    assert principal.user_id == user.id
    assert built == []
    assert principal.user is user
    assert principal.user is user
    assert built == [user]


def test_the_workspace_row_is_built_once_and_only_when_asked() -> None:
    workspace = Workspace(id=uuid.uuid4(), name="Lazy", slug="lazy")
    built: list[Workspace] = []

    def load() -> Workspace:
        built.append(workspace)
        return workspace

    principal = Principal(User(id=uuid.uuid4(), email="p@example.com"))
    access = WorkspaceAccess(
        principal, None, Role.EDITOR, workspace_id=workspace.id, load_workspace=load
    )
    assert (access.workspace_id, access.role, built) == (workspace.id, Role.EDITOR, [])
    assert access.workspace is workspace and access.workspace is workspace
    assert built == [workspace]
    assert access.user is principal.user


def test_rows_given_up_front_are_used_as_they_are() -> None:
    user = User(id=uuid.uuid4(), email="eager@example.com")
    workspace = Workspace(id=uuid.uuid4(), name="Eager", slug="eager")
    access = WorkspaceAccess(Principal(user=user), workspace, Role.OWNER, resource="row")
    assert access.principal.user_id == user.id and access.user is user
    assert access.workspace_id == workspace.id and access.workspace is workspace
    assert access.resource == "row"
