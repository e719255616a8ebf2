"""Workspaces, members, invitations, API keys and the activity log, as a client uses them."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.permissions import Role
from backend.config import Settings
from backend.models import Workspace
from tests.support.identity import (
    Actor,
    make_user,
    make_workspace,
    member,
    sign_in,
    unique_email,
)
from tests.support.mail import Mailbox, body_of

API = "/api/v1"


@pytest.fixture
async def owner(session: AsyncSession, settings: Settings, team: Workspace) -> Actor:
    return await member(session, settings, team, Role.OWNER)


async def test_create_list_update_delete_workspace(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    actor = await sign_in(session, settings, await make_user(session))
    r = await client.post(
        f"{API}/workspaces",
        headers=actor.headers,
        json={"name": "Data Team", "settings": {"retention_days": 14}},
    )
    assert r.status_code == 201, r.text
    ws = r.json()
    assert ws["role"] == "owner"
    assert ws["slug"].startswith("data-team-")
    listed = (await client.get(f"{API}/workspaces", headers=actor.headers)).json()
    assert listed["total"] == 1
    assert [w["id"] for w in listed["items"]] == [ws["id"]]
    r = await client.patch(
        f"{API}/workspaces/{ws['id']}", headers=actor.headers, json={"name": "Data"}
    )
    assert r.json()["name"] == "Data"
    assert r.json()["settings"] == {"retention_days": 14}
    assert (
        await client.delete(f"{API}/workspaces/{ws['id']}", headers=actor.headers)
    ).status_code == 204
    assert (
        await client.get(f"{API}/workspaces/{ws['id']}", headers=actor.headers)
    ).status_code == 404


@pytest.mark.parametrize("field", ["id", "owner_id", "role", "workspace_id", "slug", "unknown"])
async def test_mass_assignment_is_rejected(
    client: httpx.AsyncClient, owner: Actor, team: Workspace, field: str
) -> None:
    bodies = [
        ("POST", f"{API}/workspaces", {"name": "X"}),
        ("PATCH", f"{API}/workspaces/{team.id}", {"name": "X"}),
        ("POST", f"{API}/workspaces/{team.id}/invite", {"email": unique_email()}),
        ("POST", f"{API}/workspaces/{team.id}/api-keys", {"name": "k"}),
        ("PATCH", f"{API}/auth/me", {"name": "X"}),
    ]
    for method, url, body in bodies:
        if field in body:
            continue
        r = await client.request(
            method, url, headers=owner.headers, json={**body, field: str(uuid.uuid4())}
        )
        assert r.status_code == 422, (url, r.text)
        assert r.json()["fields"][0]["field"] == field


async def test_settings_are_merged_not_replaced_and_checked_naming_the_field(
    client: httpx.AsyncClient, session: AsyncSession, team: Workspace, owner: Actor
) -> None:
    """PATCH merges `settings` into what is stored (JSON Merge Patch): setting the
    retention keeps the quotas an administrator lowered; a null removes one key. Values
    the service reads are checked, and a refusal leaves what was stored alone."""
    url = f"{API}/workspaces/{team.id}"
    r = await client.patch(
        url, headers=owner.headers,
        json={"settings": {"quotas": {"n8n_toggles_per_day": 5}, "theme": "dark"}},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    r = await client.patch(url, headers=owner.headers, json={"settings": {"retention_days": 90}})
    assert r.json()["settings"] == {
        "quotas": {"n8n_toggles_per_day": 5}, "theme": "dark", "retention_days": 90,
    }  # fmt: skip
    r = await client.patch(
        url, headers=owner.headers,
        json={"settings": {"theme": None, "quotas": {"n8n_refreshes_per_day": 2}}},
    )  # fmt: skip
    merged = {
        "quotas": {"n8n_toggles_per_day": 5, "n8n_refreshes_per_day": 2}, "retention_days": 90,
    }  # fmt: skip
    assert r.json()["settings"] == merged
    for bad, field in (
        ({"retention_days": 0}, "settings.retention_days"),
        ({"retention_days": "90"}, "settings.retention_days"),
        ({"retention_days": True}, "settings.retention_days"),
        ({"quotas": []}, "settings.quotas"),
        ({"quotas": {"runs_per_day": 10**6}}, "settings.quotas.runs_per_day"),
        ({"quotas": {"n8n_toggles_per_day": -1}}, "settings.quotas.n8n_toggles_per_day"),
    ):
        r = await client.patch(url, headers=owner.headers, json={"settings": bad})
        assert (r.status_code, r.json()["error"], r.json()["field"]) == (
            422, "validation_error", field,
        ), (bad, r.text)  # fmt: skip
    assert (await client.get(url, headers=owner.headers)).json()["settings"] == merged
    # Settings stay small (every member reads them with each listing), merged or not.
    r = await client.patch(url, headers=owner.headers, json={"settings": {"a": "x" * 40_000}})
    assert r.status_code == 200, r.text
    r = await client.patch(url, headers=owner.headers, json={"settings": {"b": "x" * 40_000}})
    assert (r.status_code, r.json()["field"]) == (422, "settings"), r.text
    r = await client.patch(url, headers=owner.headers, json={"settings": {"a": None}})
    assert r.json()["settings"] == merged
    r = await client.post(
        f"{API}/workspaces", headers=owner.headers,
        json={"name": "Bad", "settings": {"retention_days": 99999}},
    )  # fmt: skip
    assert (r.status_code, r.json()["field"]) == (422, "settings.retention_days")


async def test_role_changes_respect_rank_and_the_last_owner(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    team: Workspace,
    owner: Actor,
) -> None:
    admin = await member(session, settings, team, Role.ADMINISTRATOR)
    editor = await member(session, settings, team, Role.EDITOR)
    url = f"{API}/workspaces/{team.id}/members"
    r = await client.patch(
        f"{url}/{editor.user.id}", headers=admin.headers, json={"role": "viewer"}
    )
    assert (r.status_code, r.json()["role"]) == (200, "viewer")
    # An administrator cannot make an owner, nor touch one.
    assert (
        await client.patch(f"{url}/{editor.user.id}", headers=admin.headers, json={"role": "owner"})
    ).status_code == 403
    assert (
        await client.patch(f"{url}/{owner.user.id}", headers=admin.headers, json={"role": "viewer"})
    ).status_code == 403
    # The last owner stays an owner and stays in.
    r = await client.patch(f"{url}/{owner.user.id}", headers=owner.headers, json={"role": "editor"})
    assert (r.status_code, r.json()["error"]) == (409, "conflict")
    assert (await client.delete(f"{url}/{owner.user.id}", headers=owner.headers)).status_code == 409
    assert (
        await client.delete(f"{url}/{editor.user.id}", headers=admin.headers)
    ).status_code == 204
    members = (await client.get(url, headers=owner.headers)).json()
    assert {m["email"] for m in members["items"]} == {owner.user.email, admin.user.email}
    # A member id from another workspace is not found here.
    other = await make_workspace(session, "Other")
    stranger = await member(session, settings, other, Role.OWNER)
    assert (
        await client.patch(
            f"{url}/{stranger.user.id}", headers=owner.headers, json={"role": "viewer"}
        )
    ).status_code == 404


async def test_api_keys_are_shown_once_capped_by_role_and_revocable(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, team: Workspace
) -> None:
    editor = await member(session, settings, team, Role.EDITOR)
    url = f"{API}/workspaces/{team.id}/api-keys"
    assert (
        await client.post(url, headers=editor.headers, json={"name": "ci", "role": "administrator"})
    ).status_code == 403
    r = await client.post(
        url, headers=editor.headers, json={"name": "ci", "role": "editor", "expires_in_days": 30}
    )
    assert r.status_code == 201, r.text
    created = r.json()
    key = created["key"]
    assert key.startswith("osk_")
    assert key.startswith(created["prefix"])
    listed = (await client.get(url, headers=editor.headers)).json()
    assert [k["id"] for k in listed] == [created["id"]]
    assert "key" not in listed[0]
    # The key works, through either header, for what API keys may do...
    for headers in ({"X-API-Key": key}, {"Authorization": f"Bearer {key}"}):
        assert (await client.get(f"{API}/workspaces/{team.id}", headers=headers)).status_code == 200
    # ...and never for what takes a person.
    assert (await client.get(f"{API}/auth/me", headers={"X-API-Key": key})).status_code == 403
    assert (await client.get(url, headers={"X-API-Key": key})).status_code == 403
    assert (
        await client.delete(f"{url}/{created['id']}", headers=editor.headers)
    ).status_code == 204
    assert (
        await client.get(f"{API}/workspaces/{team.id}", headers={"X-API-Key": key})
    ).status_code == 401


async def test_activity_records_mutations_with_filters(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    team: Workspace,
    owner: Actor,
) -> None:
    viewer = await member(session, settings, team, Role.VIEWER)
    await client.patch(
        f"{API}/workspaces/{team.id}",
        headers=owner.headers | {"User-Agent": "studio-test/1"},
        json={"name": "Renamed"},
    )
    await client.patch(
        f"{API}/workspaces/{team.id}/members/{viewer.user.id}",
        headers=owner.headers,
        json={"role": "editor"},
    )
    await client.post(
        f"{API}/workspaces/{team.id}/api-keys", headers=owner.headers, json={"name": "k"}
    )
    url = f"{API}/workspaces/{team.id}/activity"
    everything = (await client.get(url, headers=owner.headers)).json()
    actions = [a["action"] for a in everything["items"]]
    assert actions == ["api_key.create", "members.change_role", "workspace.update"]
    update = everything["items"][-1]
    assert update["user_id"] == str(owner.user.id)
    assert update["user_agent"] == "studio-test/1"
    assert update["ip"]
    members_only = (
        await client.get(url, headers=owner.headers, params={"action": "members."})
    ).json()
    assert [a["action"] for a in members_only["items"]] == ["members.change_role"]
    page = (await client.get(url, headers=owner.headers, params={"limit": 1, "offset": 1})).json()
    assert (page["total"], len(page["items"]), page["items"][0]["action"]) == (
        3,
        1,
        "members.change_role",
    )
    assert (await client.get(url, headers=owner.headers, params={"limit": 1000})).status_code == 422


@pytest.mark.xdist_group("crossprocess")
@pytest.mark.usefixtures("worker_name")
async def test_invitation_by_mail_then_accept(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    team: Workspace,
    owner: Actor,
    mailbox: Mailbox,
) -> None:
    email = unique_email("invitee")
    before = mailbox.count()
    r = await client.post(
        f"{API}/workspaces/{team.id}/invite",
        headers=owner.headers,
        json={"email": email, "role": "viewer"},
    )
    assert r.status_code == 201, r.text
    found = re.search(
        r"/api/v1/invitations/([A-Za-z0-9_-]+)/accept",
        body_of(mailbox.wait_for(email, after=before)),
    )
    assert found
    token = found.group(1)

    invitee = await sign_in(session, settings, await make_user(session, email))
    mine = (await client.get(f"{API}/invitations", headers=invitee.headers)).json()
    assert [(i["workspace_id"], i["role"]) for i in mine] == [(str(team.id), "viewer")]
    # Someone else holding the token cannot use it.
    intruder = await sign_in(session, settings, await make_user(session))
    assert (
        await client.post(f"{API}/invitations/{token}/accept", headers=intruder.headers)
    ).status_code == 404
    r = await client.post(f"{API}/invitations/{token}/accept", headers=invitee.headers)
    assert (r.status_code, r.json()["role"]) == (200, "viewer")
    assert (
        await client.get(f"{API}/workspaces/{team.id}", headers=invitee.headers)
    ).status_code == 200
    # Single use.
    assert (
        await client.post(f"{API}/invitations/{token}/accept", headers=invitee.headers)
    ).status_code == 404
    # Inviting an existing member is a conflict, naming the field.
    r = await client.post(
        f"{API}/workspaces/{team.id}/invite", headers=owner.headers, json={"email": email}
    )
    assert (r.status_code, r.json()["field"]) == (409, "email")


async def test_invite_cannot_grant_more_than_the_inviter_has(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, team: Workspace
) -> None:
    admin = await member(session, settings, team, Role.ADMINISTRATOR)
    r = await client.post(
        f"{API}/workspaces/{team.id}/invite",
        headers=admin.headers,
        json={"email": unique_email(), "role": "owner"},
    )
    assert r.status_code == 403
    assert r.json()["field"] == "role"


async def test_pending_invitations_are_listed_replaced_and_revocable(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    team: Workspace,
    owner: Actor,
) -> None:
    email = unique_email("pending")
    url = f"{API}/workspaces/{team.id}"
    await client.post(
        f"{url}/invite", headers=owner.headers, json={"email": email, "role": "viewer"}
    )
    await client.post(
        f"{url}/invite", headers=owner.headers, json={"email": email, "role": "editor"}
    )
    pending = (await client.get(f"{url}/invitations", headers=owner.headers)).json()
    # Re-inviting replaced the first invitation.
    assert [(i["email"], i["role"]) for i in pending] == [(email, "editor")]
    assert (
        await client.delete(f"{url}/invitations/{pending[0]['id']}", headers=owner.headers)
    ).status_code == 204
    assert (await client.get(f"{url}/invitations", headers=owner.headers)).json() == []
    assert (
        await client.delete(f"{url}/invitations/{pending[0]['id']}", headers=owner.headers)
    ).status_code == 404


async def test_an_invitation_never_grants_more_than_its_inviter_holds_today(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    team: Workspace,
    owner: Actor,
) -> None:
    from backend.kit.crypto import hash_token, new_token
    from backend.models import Invitation, WorkspaceMember

    admin = await member(session, settings, team, Role.ADMINISTRATOR)
    email = unique_email("capped")
    token = new_token()
    session.add(
        Invitation(
            workspace_id=team.id,
            email=email,
            role="administrator",
            token_hash=hash_token(token),
            invited_by=admin.user.id,
            expires_at=datetime.now(UTC) + timedelta(days=1),
        )
    )
    await session.flush()
    # The inviter is demoted before the invitation is accepted.
    r = await client.patch(
        f"{API}/workspaces/{team.id}/members/{admin.user.id}",
        headers=owner.headers,
        json={"role": "viewer"},
    )
    assert r.status_code == 200
    invitee = await sign_in(session, settings, await make_user(session, email))
    r = await client.post(f"{API}/invitations/{token}/accept", headers=invitee.headers)
    assert (r.status_code, r.json()["role"]) == (200, "viewer")
    role = await session.scalar(
        select(WorkspaceMember.role).where(WorkspaceMember.user_id == invitee.user.id)
    )
    assert role == "viewer"


async def test_removing_a_member_revokes_their_api_keys(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    team: Workspace,
    owner: Actor,
) -> None:
    editor = await member(session, settings, team, Role.EDITOR)
    created = (
        await client.post(
            f"{API}/workspaces/{team.id}/api-keys",
            headers=editor.headers,
            json={"name": "ci", "role": "viewer"},
        )
    ).json()
    assert (
        await client.get(f"{API}/workspaces/{team.id}", headers={"X-API-Key": created["key"]})
    ).status_code == 200
    assert (
        await client.delete(
            f"{API}/workspaces/{team.id}/members/{editor.user.id}", headers=owner.headers
        )
    ).status_code == 204
    assert (
        await client.get(f"{API}/workspaces/{team.id}", headers={"X-API-Key": created["key"]})
    ).status_code == 401


async def test_activity_hides_addresses_below_administrator(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    team: Workspace,
    owner: Actor,
) -> None:
    editor = await member(session, settings, team, Role.EDITOR)
    await client.patch(f"{API}/workspaces/{team.id}", headers=owner.headers, json={"name": "Seen"})
    as_owner = (
        await client.get(f"{API}/workspaces/{team.id}/activity", headers=owner.headers)
    ).json()["items"]
    as_editor = (
        await client.get(f"{API}/workspaces/{team.id}/activity", headers=editor.headers)
    ).json()["items"]
    assert as_owner[0]["ip"]
    assert as_editor[0]["ip"] is None
    assert as_editor[0]["user_agent"] is None
    assert as_editor[0]["action"] == "workspace.update"


async def test_names_with_control_characters_are_refused(
    client: httpx.AsyncClient, owner: Actor
) -> None:
    r = await client.post(
        f"{API}/workspaces", headers=owner.headers, json={"name": "evil\r\nBcc: x@example.com"}
    )
    assert r.status_code == 422
    assert r.json()["fields"][0]["field"] == "name"
