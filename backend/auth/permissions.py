"""Roles and the permission matrix. A route declares the one permission it needs;
nothing else decides who may call it."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    OWNER = "owner"
    ADMINISTRATOR = "administrator"
    EDITOR = "editor"
    VIEWER = "viewer"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def at_least(self, other: Role) -> bool:
        return self.rank >= other.rank


_RANK = {Role.VIEWER: 1, Role.EDITOR: 2, Role.ADMINISTRATOR: 3, Role.OWNER: 4}


class Permission(StrEnum):
    WORKSPACE_READ = "workspace.read"
    WORKSPACE_SETTINGS = "workspace.settings"
    WORKSPACE_DELETE = "workspace.delete"
    MEMBERS_READ = "members.read"
    MEMBERS_INVITE = "members.invite"
    MEMBERS_REMOVE = "members.remove"
    MEMBERS_CHANGE_ROLE = "members.change_role"
    API_KEYS_MANAGE = "api_keys.manage"
    ACTIVITY_READ = "activity.read"
    WORKFLOWS_READ = "workflows.read"
    WORKFLOWS_WRITE = "workflows.write"
    WORKFLOWS_DELETE = "workflows.delete"
    # Distinct from read: a viewer can look at a workflow and its runs, not start one.
    WORKFLOWS_EXECUTE = "workflows.execute"
    ANALYTICS_READ = "analytics.read"
    # Metadata only: no route ever returns a secret.
    CREDENTIALS_READ = "credentials.read"
    CREDENTIALS_WRITE = "credentials.write"


P = Permission
_VIEWER = {
    P.WORKSPACE_READ,
    P.MEMBERS_READ,
    P.WORKFLOWS_READ,
    P.ANALYTICS_READ,
    P.CREDENTIALS_READ,
}
_EDITOR = _VIEWER | {
    P.WORKFLOWS_WRITE,
    P.WORKFLOWS_DELETE,
    P.WORKFLOWS_EXECUTE,
    P.ACTIVITY_READ,
    P.API_KEYS_MANAGE,
    P.CREDENTIALS_WRITE,
}
_ADMINISTRATOR = _EDITOR | {
    P.WORKSPACE_SETTINGS,
    P.MEMBERS_INVITE,
    P.MEMBERS_REMOVE,
    P.MEMBERS_CHANGE_ROLE,
}
_OWNER = _ADMINISTRATOR | {P.WORKSPACE_DELETE}

MATRIX: dict[Role, frozenset[Permission]] = {
    Role.VIEWER: frozenset(_VIEWER),
    Role.EDITOR: frozenset(_EDITOR),
    Role.ADMINISTRATOR: frozenset(_ADMINISTRATOR),
    Role.OWNER: frozenset(_OWNER),
}

# What an API key may do at all, whatever its role: run and read things. Managing
# people, keys and the workspace itself takes a person signed in.
API_KEY_PERMISSIONS = frozenset(
    {
        P.WORKSPACE_READ,
        P.WORKFLOWS_READ,
        P.WORKFLOWS_WRITE,
        P.WORKFLOWS_DELETE,
        P.WORKFLOWS_EXECUTE,
        P.ANALYTICS_READ,
        P.ACTIVITY_READ,
        P.CREDENTIALS_READ,
    }
)


def allows(role: Role, permission: Permission) -> bool:
    return permission in MATRIX[role]
