"""Workspaces, members and invitations. Every change is written to the activity log in
the same transaction."""

from __future__ import annotations

import json
import re
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from backend.activity.service import record
from backend.auth.dependencies import Principal, WorkspaceAccess
from backend.auth.permissions import Role
from backend.config import Settings
from backend.kit.crypto import hash_token, new_token
from backend.kit.db import UnitOfWork
from backend.kit.errors import Conflict, NotFound, PermissionDenied, ValidationFailed
from backend.kit.mail import send_mail
from backend.kit.ratelimit import RateLimiter
from backend.models import ApiKey, Invitation, User, Workspace, WorkspaceMember
from backend.quotas.service import ACTIONS as OWN_QUOTAS
from backend.workspaces.schemas import (
    InviteCreate,
    MemberRead,
    WorkspaceCreate,
    WorkspaceRead,
    WorkspaceUpdate,
    WorkspaceWithRole,
)


def _now() -> datetime:
    return datetime.now(UTC)


def merge_patch(target: Any, patch: Any) -> Any:
    """JSON Merge Patch (RFC 7386): objects merge key by key, recursively; a null removes
    its key; anything else replaces what was there."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


MAX_SETTINGS_CHARS = 65_536


def check_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings this service reads, checked (the rest is the front end's, kept as
    sent): a value the maintenance task or a quota would silently ignore is refused,
    naming it."""
    if len(json.dumps(settings, default=str)) > MAX_SETTINGS_CHARS:
        # Every member reads them with each workspace listing.
        raise ValidationFailed(
            f"settings are at most {MAX_SETTINGS_CHARS} characters as JSON", field="settings"
        )
    days = settings.get("retention_days")
    if days is not None and (
        isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 3650
    ):
        raise ValidationFailed(
            "retention_days must be a whole number of days from 1 to 3650",
            field="settings.retention_days",
        )
    own = settings.get("quotas")
    if own is not None:
        if not isinstance(own, dict):
            raise ValidationFailed("quotas must be an object", field="settings.quotas")
        for name, value in own.items():
            if name not in OWN_QUOTAS:
                raise ValidationFailed(
                    f"a workspace may lower only {', '.join(sorted(OWN_QUOTAS))}",
                    field=f"settings.quotas.{name}"[:200],
                )
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValidationFailed(
                    f"{name} must be a number, 0 or more", field=f"settings.quotas.{name}"
                )
    return settings


def _slug(name: str) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60] or "workspace"
    # A random suffix instead of a uniqueness probe: no race, no enumeration.
    return f"{base}-{secrets.token_hex(3)}"


async def _create(
    session: AsyncSession, user: User, name: str, settings: dict[str, Any], *, personal: bool
) -> Workspace:
    workspace = Workspace(name=name, slug=_slug(name), settings=settings, is_personal=personal)
    session.add(workspace)
    await session.flush()
    session.add(WorkspaceMember(workspace_id=workspace.id, user_id=user.id, role=Role.OWNER.value))
    await session.flush()
    return workspace


async def create_personal_workspace(session: AsyncSession, user: User) -> Workspace:
    name = f"{user.name or user.email.split('@')[0]}'s workspace"
    workspace = await _create(session, user, name, {}, personal=True)
    record(
        session,
        None,
        user_id=user.id,
        workspace_id=workspace.id,
        action="workspace.create",
        resource_type="workspace",
        resource_id=workspace.id,
    )
    return workspace


async def create_workspace(
    uow: UnitOfWork, principal: Principal, data: WorkspaceCreate
) -> WorkspaceWithRole:
    workspace = await _create(
        uow.session, principal.user, data.name, check_settings(data.settings), personal=False
    )
    record(
        uow.session,
        principal,
        workspace_id=workspace.id,
        action="workspace.create",
        resource_type="workspace",
        resource_id=workspace.id,
    )
    return _with_role(workspace, Role.OWNER)


def _with_role(workspace: Workspace, role: Role) -> WorkspaceWithRole:
    base = WorkspaceRead.model_validate(workspace)
    return WorkspaceWithRole(**base.model_dump(), role=role)


async def list_mine(
    uow: UnitOfWork, principal: Principal, *, limit: int, offset: int
) -> tuple[list[WorkspaceWithRole], int]:
    base = (
        select(Workspace, WorkspaceMember.role)
        .join(WorkspaceMember, WorkspaceMember.workspace_id == Workspace.id)
        .where(WorkspaceMember.user_id == principal.user.id)
    )
    total = await uow.session.scalar(select(func.count()).select_from(base.subquery()))
    rows = await uow.session.execute(
        base.order_by(Workspace.created_at, Workspace.id).limit(limit).offset(offset)
    )
    return [_with_role(ws, Role(role)) for ws, role in rows.all()], int(total or 0)


def read(access: WorkspaceAccess) -> WorkspaceWithRole:
    return _with_role(access.workspace, access.role)


async def update_workspace(
    uow: UnitOfWork, access: WorkspaceAccess, data: WorkspaceUpdate
) -> WorkspaceWithRole:
    values = data.model_dump(exclude_unset=True)
    workspace = access.workspace
    if values.get("settings") is not None:
        # Merged into what is stored, not put in its place: setting the retention must
        # not drop the quotas an administrator lowered (a null removes one key).
        merged = merge_patch(workspace.settings, values["settings"])
        # Only what this request touches is checked: a value stored before the checks
        # existed does not block an unrelated change. The size is the merged whole's.
        check_settings({key: merged[key] for key in values["settings"] if key in merged})
        if len(json.dumps(merged, default=str)) > MAX_SETTINGS_CHARS:
            raise ValidationFailed(
                f"settings are at most {MAX_SETTINGS_CHARS} characters as JSON", field="settings"
            )
        values["settings"] = merged
    for key, value in values.items():
        if value is not None:
            setattr(workspace, key, value)
    await uow.session.flush()
    await uow.session.refresh(workspace)
    record(
        uow.session,
        access.principal,
        workspace_id=workspace.id,
        action="workspace.update",
        resource_type="workspace",
        resource_id=workspace.id,
        details={"fields": sorted(values)},
    )
    return read(access)


async def delete_workspace(uow: UnitOfWork, access: WorkspaceAccess) -> None:
    workspace = access.workspace
    record(
        uow.session,
        access.principal,
        workspace_id=workspace.id,
        action="workspace.delete",
        resource_type="workspace",
        resource_id=workspace.id,
        details={"name": workspace.name},
    )
    await uow.session.delete(workspace)
    await uow.session.flush()


# Members -------------------------------------------------------------------------------


async def list_members(
    uow: UnitOfWork, access: WorkspaceAccess, *, limit: int, offset: int
) -> tuple[list[MemberRead], int]:
    base = (
        select(WorkspaceMember, User)
        .join(User, User.id == WorkspaceMember.user_id)
        .where(WorkspaceMember.workspace_id == access.workspace.id)
    )
    total = await uow.session.scalar(select(func.count()).select_from(base.subquery()))
    rows = await uow.session.execute(
        base.order_by(WorkspaceMember.created_at, User.email).limit(limit).offset(offset)
    )
    items = [
        MemberRead(
            user_id=u.id, email=u.email, name=u.name, role=Role(m.role), joined_at=m.created_at
        )
        for m, u in rows.all()
    ]
    return items, int(total or 0)


async def _member(
    session: AsyncSession, workspace_id: uuid.UUID, user_id: uuid.UUID
) -> WorkspaceMember:
    stmt = select(WorkspaceMember).where(
        WorkspaceMember.workspace_id == workspace_id, WorkspaceMember.user_id == user_id
    )
    member = await session.scalar(stmt)
    if member is None:
        raise NotFound("member not found")
    return member


async def _owner_count(session: AsyncSession, workspace_id: uuid.UUID) -> int:
    # Callers hold the workspace lock, so no other change can slip in between.
    count = await session.scalar(
        select(func.count()).where(
            WorkspaceMember.workspace_id == workspace_id, WorkspaceMember.role == Role.OWNER.value
        )
    )
    return int(count or 0)


async def _lock_membership_changes(session: AsyncSession, access: WorkspaceAccess) -> Role:
    """Serialise every membership change of a workspace on its row, and return the
    caller's role as it stands under that lock (it may have just been lowered).

    One lock, always taken first: two owners demoting each other queue instead of
    deadlocking on each other's member rows.
    """
    await session.execute(
        select(Workspace.id).where(Workspace.id == access.workspace.id).with_for_update()
    )
    if access.principal.api_key is not None:
        return access.role
    role = await session.scalar(
        select(WorkspaceMember.role).where(
            WorkspaceMember.workspace_id == access.workspace.id,
            WorkspaceMember.user_id == access.user.id,
        )
    )
    if role is None:
        raise NotFound("workspace not found")
    return Role(role)


async def _check_can_manage(caller: Role, member: WorkspaceMember, new_role: Role | None) -> None:
    current = Role(member.role)
    if not caller.at_least(Role.ADMINISTRATOR):
        raise PermissionDenied(f"a {caller.value} cannot manage members")
    if not caller.at_least(current):
        raise PermissionDenied(f"a {caller.value} cannot change a {current.value}")
    if new_role is not None and not caller.at_least(new_role):
        raise PermissionDenied(f"a {caller.value} cannot grant {new_role.value}", field="role")


async def change_role(
    uow: UnitOfWork, access: WorkspaceAccess, user_id: uuid.UUID, role: Role
) -> MemberRead:
    session = uow.session
    caller = await _lock_membership_changes(session, access)
    member = await _member(session, access.workspace.id, user_id)
    await _check_can_manage(caller, member, role)
    old = Role(member.role)
    if (
        old == Role.OWNER
        and role != Role.OWNER
        and await _owner_count(session, access.workspace.id) <= 1
    ):
        raise Conflict("a workspace keeps at least one owner", field="role")
    member.role = role.value
    await session.flush()
    record(
        session,
        access.principal,
        workspace_id=access.workspace.id,
        action="members.change_role",
        resource_type="member",
        resource_id=user_id,
        details={"from": old.value, "to": role.value},
    )
    user = await session.get(User, user_id)
    assert user is not None
    return MemberRead(
        user_id=user.id, email=user.email, name=user.name, role=role, joined_at=member.created_at
    )


async def remove_member(uow: UnitOfWork, access: WorkspaceAccess, user_id: uuid.UUID) -> None:
    session = uow.session
    caller = await _lock_membership_changes(session, access)
    member = await _member(session, access.workspace.id, user_id)
    await _check_can_manage(caller, member, None)
    if member.role == Role.OWNER.value and await _owner_count(session, access.workspace.id) <= 1:
        raise Conflict("the last owner cannot be removed")
    await session.delete(member)
    # Keys act with their creator's authority: it leaves with the person.
    await session.execute(
        update(ApiKey)
        .where(
            ApiKey.workspace_id == access.workspace.id,
            ApiKey.created_by == user_id,
            ApiKey.revoked_at.is_(None),
        )
        .values(revoked_at=_now())
    )
    await session.flush()
    record(
        session,
        access.principal,
        workspace_id=access.workspace.id,
        action="members.remove",
        resource_type="member",
        resource_id=user_id,
    )


# Invitations ---------------------------------------------------------------------------


async def invite(
    uow: UnitOfWork,
    settings: Settings,
    limiter: RateLimiter,
    access: WorkspaceAccess,
    data: InviteCreate,
) -> tuple[Invitation, str]:
    if not access.role.at_least(data.role):
        raise PermissionDenied(
            f"a {access.role.value} cannot invite a {data.role.value}", field="role"
        )
    await limiter.hit(
        settings.auth.invite_limit, "invite", str(access.workspace.id), what="invitations"
    )
    session = uow.session
    email = data.email.lower()
    # A new invitation replaces any pending one for the same address.
    await session.execute(
        delete(Invitation).where(
            Invitation.workspace_id == access.workspace.id,
            Invitation.email == email,
            Invitation.accepted_at.is_(None),
        )
    )
    already = await session.scalar(
        select(WorkspaceMember.id)
        .join(User, User.id == WorkspaceMember.user_id)
        .where(WorkspaceMember.workspace_id == access.workspace.id, User.email == email)
    )
    if already is not None:
        raise Conflict(f"{email} is already a member", field="email")
    token = new_token()
    invitation = Invitation(
        workspace_id=access.workspace.id,
        email=email,
        role=data.role.value,
        token_hash=hash_token(token),
        invited_by=access.user.id,
        expires_at=_now() + timedelta(seconds=settings.auth.invitation_ttl_s),
    )
    session.add(invitation)
    await session.flush()
    record(
        session,
        access.principal,
        workspace_id=access.workspace.id,
        action="members.invite",
        resource_type="invitation",
        resource_id=invitation.id,
        details={"email": email, "role": data.role.value},
    )
    inviter = access.user.name or access.user.email
    send_mail(
        uow, settings, to=email,
        subject=f"{inviter} invited you to {access.workspace.name}",
        body=(
            f"{inviter} invited you to the workspace {access.workspace.name!r} "
            f"as {data.role.value}.\n\n"
            f"Sign in with this address, then accept with the invitation token:\n\n{token}\n\n"
            f"(POST /api/v1/invitations/{token}/accept). It works once and expires in "
            f"{settings.auth.invitation_ttl_s // 86400} days."
        ),
    )  # fmt: skip
    return invitation, token


async def my_invitations(uow: UnitOfWork, principal: Principal) -> list[tuple[Invitation, str]]:
    rows = await uow.session.execute(
        select(Invitation, Workspace.name)
        .join(Workspace, Workspace.id == Invitation.workspace_id)
        .where(
            Invitation.email == principal.user.email.lower(),
            Invitation.accepted_at.is_(None),
            Invitation.expires_at > _now(),
        )
        .order_by(Invitation.created_at.desc())
    )
    return [(inv, name) for inv, name in rows.all()]


async def accept_invitation(uow: UnitOfWork, principal: Principal, token: str) -> WorkspaceWithRole:
    session = uow.session
    invitation = await session.scalar(
        select(Invitation).where(Invitation.token_hash == hash_token(token)).with_for_update()
    )
    # One answer for unknown, someone else's, used and expired: the token is the secret.
    if (
        invitation is None
        or invitation.email != principal.user.email.lower()
        or invitation.accepted_at is not None
        or invitation.expires_at <= _now()
    ):
        raise NotFound("invitation not found or no longer valid")
    # The invitation carries its inviter's authority, as it stands today: an inviter
    # who left voids it, one who was demoted cannot grant more than they now hold.
    inviter_role = (
        await session.scalar(
            select(WorkspaceMember.role).where(
                WorkspaceMember.workspace_id == invitation.workspace_id,
                WorkspaceMember.user_id == invitation.invited_by,
            )
        )
        if invitation.invited_by
        else None
    )
    if inviter_role is None:
        raise NotFound("invitation not found or no longer valid")
    granted = Role(invitation.role)
    if not Role(inviter_role).at_least(granted):
        granted = Role(inviter_role)
    existing = await session.scalar(
        select(WorkspaceMember).where(
            WorkspaceMember.workspace_id == invitation.workspace_id,
            WorkspaceMember.user_id == principal.user.id,
        )
    )
    if existing is not None:
        raise Conflict("already a member of this workspace")
    invitation.accepted_at = _now()
    session.add(
        WorkspaceMember(
            workspace_id=invitation.workspace_id, user_id=principal.user.id, role=granted.value
        )
    )
    await session.flush()
    record(
        session,
        principal,
        workspace_id=invitation.workspace_id,
        action="members.join",
        resource_type="invitation",
        resource_id=invitation.id,
        details={"role": granted.value},
    )
    workspace = await session.get(Workspace, invitation.workspace_id)
    assert workspace is not None
    return _with_role(workspace, granted)


async def pending_invitations(uow: UnitOfWork, access: WorkspaceAccess) -> list[Invitation]:
    rows = await uow.session.scalars(
        select(Invitation)
        .where(
            Invitation.workspace_id == access.workspace.id,
            Invitation.accepted_at.is_(None),
            Invitation.expires_at > _now(),
        )
        .order_by(Invitation.created_at.desc())
    )
    return list(rows.all())


async def revoke_invitation(
    uow: UnitOfWork, access: WorkspaceAccess, invitation_id: uuid.UUID
) -> None:
    invitation = await uow.session.scalar(
        select(Invitation).where(
            Invitation.id == invitation_id,
            Invitation.workspace_id == access.workspace.id,
            Invitation.accepted_at.is_(None),
        )
    )
    if invitation is None:
        raise NotFound("invitation not found")
    await uow.session.delete(invitation)
    await uow.session.flush()
    record(
        uow.session,
        access.principal,
        workspace_id=access.workspace.id,
        action="members.invitation_revoke",
        resource_type="invitation",
        resource_id=invitation_id,
        details={"email": invitation.email},
    )
