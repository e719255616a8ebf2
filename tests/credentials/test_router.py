"""Credentials: a canary secret goes in and never comes out, in any response, log line
or database column; rotation keeps every row readable with only the new key."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.permissions import Role
from backend.config import Settings
from backend.credentials.service import reveal, rotate_all
from backend.models import Credential, Workspace
from tests.support.factories import MINIMAL
from tests.support.identity import Actor, member

API = "/api/v1/credentials"
CANARY = "canary-" + uuid.uuid4().hex


async def test_the_canary_never_leaves(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    editor: Actor,
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG):
        r = await client.post(
            API,
            headers=editor.headers,
            json={"name": "Stripe", "secret": {"type": "bearer", "token": CANARY}},
        )
        assert r.status_code == 201, r.text
        seen.append(r.text)
        cred = r.json()
        assert cred["hint"] == "…" + CANARY[-4:]
        assert cred["type"] == "bearer"
        for url in (API, f"{API}/{cred['id']}"):
            seen.append((await client.get(url, headers=editor.headers)).text)
        r = await client.patch(
            f"{API}/{cred['id']}",
            headers=editor.headers,
            json={"secret": {"type": "basic", "username": "u", "password": CANARY + "-2"}},
        )
        seen.append(r.text)
        seen.append(
            (
                await client.get(
                    f"/api/v1/workspaces/{editor.headers['X-Workspace-ID']}/activity",
                    headers=editor.headers,
                )
            ).text
        )
        # A validation error must not echo the secret back either.
        r = await client.post(
            API,
            headers=editor.headers,
            json={"name": "Bad", "secret": {"type": "bearer", "token": CANARY, "extra": 1}},
        )
        assert r.status_code == 422
        seen.append(r.text)
    assert all(CANARY not in body for body in seen)
    assert all(
        CANARY not in record.getMessage() and CANARY not in str(record.msg)
        for record in caplog.records
    )
    rows = (await session.execute(text("SELECT * FROM credentials"))).mappings().all()
    assert rows
    assert all(CANARY not in str(value) for row in rows for value in row.values())
    activity = (
        (await session.execute(text("SELECT details::text FROM activity_log"))).scalars().all()
    )
    assert all(CANARY not in a for a in activity)
    # The engine can still read it.
    stored = await session.get(Credential, uuid.UUID(cred["id"]))
    assert stored is not None
    assert reveal(settings, stored) == {"type": "basic", "username": "u", "password": CANARY + "-2"}


async def test_a_ciphertext_is_bound_to_its_row(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, editor: Actor
) -> None:
    ids = []
    for name in ("a", "b"):
        r = await client.post(
            API,
            headers=editor.headers,
            json={"name": name, "secret": {"type": "api_key", "key": f"{name}-{CANARY}"}},
        )
        ids.append(uuid.UUID(r.json()["id"]))
    a, b = [await session.get(Credential, i) for i in ids]
    assert a is not None and b is not None
    b.secret_encrypted = a.secret_encrypted
    with pytest.raises(ValueError, match="does not belong"):
        reveal(settings, b)


async def test_rotation_keeps_every_row_readable_with_only_the_new_key(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, editor: Actor
) -> None:
    for i in range(3):
        await client.post(
            API,
            headers=editor.headers,
            json={"name": f"k{i}", "secret": {"type": "bearer", "token": f"{CANARY}-{i}"}},
        )
    new_key = SecretStr("a-brand-new-encryption-key-" + uuid.uuid4().hex)

    def with_keys(current: SecretStr, previous: list[SecretStr]) -> Settings:
        return settings.model_copy(
            update={
                "security": settings.security.model_copy(
                    update={"encryption_key": current, "previous_encryption_keys": previous}
                )
            }
        )

    rotating = with_keys(new_key, [settings.security.encryption_key])
    assert await rotate_all(session, rotating, batch=2) >= 3
    only_new = with_keys(new_key, [])
    rows = (await session.scalars(text("SELECT id FROM credentials").columns())).all()
    for row_id in rows:
        credential = await session.get(Credential, row_id)
        assert credential is not None
        await session.refresh(credential)
        data: dict[str, Any] = reveal(only_new, credential)
        assert data["token"].startswith(CANARY)
        with pytest.raises(ValueError, match="cannot decrypt"):
            reveal(settings, credential)


async def test_a_credential_used_by_a_published_workflow_cannot_be_deleted(
    client: httpx.AsyncClient, editor: Actor
) -> None:
    cred = (
        await client.post(
            API,
            headers=editor.headers,
            json={"name": "used", "secret": {"type": "bearer", "token": CANARY}},
        )
    ).json()
    definition = json.loads(json.dumps(MINIMAL))
    definition["nodes"].append(
        {
            "id": "call",
            "type": "action",
            "config": {
                "kind": "http_request",
                "url": "https://api.example.com",
                "credential_id": cred["id"],
            },
        }
    )
    definition["connections"].append({"source": "shape", "target": "call"})
    wf = (
        await client.post(
            "/api/v1/workflows", headers=editor.headers, json={"name": "Billing", **definition}
        )
    ).json()
    # A draft does not pin it...
    assert (
        await client.patch(
            f"/api/v1/workflows/{wf['id']}/status",
            headers=editor.headers,
            json={"status": "published"},
        )
    ).status_code == 200
    # ...a published workflow does.
    r = await client.delete(f"{API}/{cred['id']}", headers=editor.headers)
    assert (r.status_code, r.json()["workflows"]) == (409, ["Billing"])


async def test_names_are_unique_per_workspace_and_viewers_cannot_write(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    team: Workspace,
    editor: Actor,
) -> None:
    body = {"name": "dup", "secret": {"type": "headers", "headers": {"X-Token": CANARY}}}
    assert (await client.post(API, headers=editor.headers, json=body)).status_code == 201
    r = await client.post(API, headers=editor.headers, json=body)
    assert (r.status_code, r.json()["field"]) == (409, "name")
    viewer = await member(session, settings, team, Role.VIEWER)
    viewer.headers["X-Workspace-ID"] = str(team.id)
    assert (
        await client.post(API, headers=viewer.headers, json={**body, "name": "v"})
    ).status_code == 403
    listed = (await client.get(API, headers=viewer.headers)).json()
    assert [c["name"] for c in listed["items"]] == ["dup"]


@pytest.mark.parametrize(
    ("secret", "field"),
    [
        ({"type": "bearer", "token": "tok\r\nX-Injected: 1"}, "secret.bearer.token"),
        ({"type": "api_key", "key": "k\nv"}, "secret.api_key.key"),
        ({"type": "headers", "headers": {"X-Token": "a\x1bb"}}, "secret.headers"),
    ],
)
async def test_a_secret_no_header_can_carry_is_refused_without_repeating_it(
    client: httpx.AsyncClient, editor: Actor, secret: dict[str, Any], field: str
) -> None:
    """A CR/LF in a header-bound secret failed only when a node sent it, with the value
    quoted in the HTTP client's error and so in the node's error."""
    r = await client.post(API, headers=editor.headers, json={"name": "bad", "secret": secret})
    assert r.status_code == 422, r.text
    assert r.json()["fields"][0]["field"].startswith(field), r.text
    assert "Injected" not in r.text and "\\u001bb" not in r.text
