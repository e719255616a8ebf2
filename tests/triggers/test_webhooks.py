"""POST /api/v1/hooks/{token}: signatures, replays, bodies, and the trigger API around it."""

from __future__ import annotations

import json
import time
import uuid

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.permissions import Role
from backend.config import Settings
from backend.kit import signing
from backend.models import ActivityLog, Trigger, Workflow, WorkflowExecution
from tests.support.identity import Actor, make_workspace, member
from tests.support.triggers import published, with_trigger


async def hook(
    session: AsyncSession, settings: Settings, *, verify: bool
) -> tuple[Workflow, Trigger, Actor]:
    workspace = await make_workspace(session)
    actor = await member(session, settings, workspace, Role.EDITOR)
    workflow = await published(
        session, workspace, with_trigger({"kind": "webhook", "verify_signature": verify})
    )
    trigger = await session.scalar(select(Trigger).where(Trigger.workflow_id == workflow.id))
    assert trigger is not None and trigger.token
    return workflow, trigger, actor


async def new_secret(client: httpx.AsyncClient, trigger: Trigger, actor: Actor) -> str:
    r = await client.post(
        f"/api/v1/workflows/{trigger.workflow_id}/triggers/{trigger.id}/secret",
        headers=actor.headers,
    )
    assert r.status_code == 201, r.text
    return str(r.json()["secret"])


def signed(secret: str, body: bytes, **override: str) -> dict[str, str]:
    return {**signing.sign(secret, body), "content-type": "application/json", **override}


async def test_an_unsigned_hook_starts_a_run_with_the_json_body(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    workflow, trigger, _ = await hook(session, settings, verify=False)
    r = await client.post(f"/api/v1/hooks/{trigger.token}", json={"order": 42, "items": [1, 2]})
    assert r.status_code == 202, r.text
    execution = await session.get(WorkflowExecution, uuid.UUID(r.json()["execution_id"]))
    assert execution is not None
    assert execution.workflow_id == workflow.id and execution.trigger_id == trigger.id
    assert execution.trigger_type == "webhook" and execution.created_by is None
    assert execution.trigger_data == {"order": 42, "items": [1, 2]}


async def test_form_bodies_become_trigger_data_and_other_types_are_refused(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    _, trigger, _ = await hook(session, settings, verify=False)
    r = await client.post(f"/api/v1/hooks/{trigger.token}", data={"a": "1", "b": "two"})
    assert r.status_code == 202, r.text
    execution = await session.get(WorkflowExecution, uuid.UUID(r.json()["execution_id"]))
    assert execution is not None and execution.trigger_data == {"a": "1", "b": "two"}
    r = await client.post(
        f"/api/v1/hooks/{trigger.token}", content=b"<x/>", headers={"content-type": "text/xml"}
    )
    assert r.status_code == 422 and r.json()["field"] == "content-type"


async def test_a_valid_signature_is_accepted(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    _, trigger, actor = await hook(session, settings, verify=True)
    secret = await new_secret(client, trigger, actor)
    body = json.dumps({"event": "paid"}).encode()
    r = await client.post(
        f"/api/v1/hooks/{trigger.token}", content=body, headers=signed(secret, body)
    )
    assert r.status_code == 202, r.text
    # The secret is stored sealed and never read back.
    await session.refresh(trigger)
    assert trigger.secret_encrypted and secret not in trigger.secret_encrypted
    listed = await client.get(
        f"/api/v1/workflows/{trigger.workflow_id}/triggers", headers=actor.headers
    )
    assert listed.status_code == 200
    assert secret not in listed.text and listed.json()[0]["has_secret"] is True


async def test_bad_signature_stale_timestamp_and_missing_headers_are_401(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    _, trigger, actor = await hook(session, settings, verify=True)
    url = f"/api/v1/hooks/{trigger.token}"
    body = b'{"event": "paid"}'
    # No secret yet: nothing can be signed correctly.
    assert (
        await client.post(url, content=body, headers=signed("whsec_" + "A" * 44, body))
    ).status_code == 401
    secret = await new_secret(client, trigger, actor)
    wrong = signed(signing.new_secret(), body)
    r = await client.post(url, content=body, headers=wrong)
    assert r.status_code == 401 and "no signature matches" in r.json()["detail"]
    tampered = signed(secret, body)
    r = await client.post(url, content=b'{"event": "refund"}', headers=tampered)
    assert r.status_code == 401
    stale_ts = int(time.time()) - 6 * 60
    message_id = "msg_stale"
    stale = {
        signing.ID_HEADER: message_id,
        signing.TIMESTAMP_HEADER: str(stale_ts),
        signing.SIGNATURE_HEADER: signing.signature(secret, message_id, stale_ts, body),
        "content-type": "application/json",
    }
    r = await client.post(url, content=body, headers=stale)
    assert r.status_code == 401 and "tolerance" in r.json()["detail"]
    r = await client.post(url, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 401 and "missing" in r.json()["detail"]
    runs = await session.scalars(
        select(WorkflowExecution).where(WorkflowExecution.trigger_id == trigger.id)
    )
    assert runs.all() == []


async def test_a_replayed_webhook_id_is_refused(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    _, trigger, actor = await hook(session, settings, verify=True)
    secret = await new_secret(client, trigger, actor)
    body = b'{"n": 1}'
    headers = signed(secret, body)
    first = await client.post(f"/api/v1/hooks/{trigger.token}", content=body, headers=headers)
    assert first.status_code == 202
    again = await client.post(f"/api/v1/hooks/{trigger.token}", content=body, headers=headers)
    assert again.status_code == 409 and again.json()["field"] == "webhook-id"
    runs = await session.scalars(
        select(WorkflowExecution).where(WorkflowExecution.trigger_id == trigger.id)
    )
    assert len(runs.all()) == 1


async def test_unknown_disabled_and_unpublished_hooks_are_404(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    r = await client.post("/api/v1/hooks/wh_nobody-has-this-token", json={})
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    workflow, trigger, actor = await hook(session, settings, verify=False)
    r = await client.post(
        f"/api/v1/workflows/{workflow.id}/triggers/{trigger.id}/disable", headers=actor.headers
    )
    assert r.status_code == 200 and r.json()["enabled"] is False
    logged = await session.scalar(
        select(ActivityLog).where(
            ActivityLog.action == "trigger.disable", ActivityLog.resource_id == str(trigger.id)
        )
    )
    assert logged is not None and logged.user_id == actor.user.id
    assert (await client.post(f"/api/v1/hooks/{trigger.token}", json={})).status_code == 404
    await client.post(
        f"/api/v1/workflows/{workflow.id}/triggers/{trigger.id}/enable", headers=actor.headers
    )
    assert (await client.post(f"/api/v1/hooks/{trigger.token}", json={})).status_code == 202
    # Archiving the workflow deactivates its triggers.
    r = await client.patch(
        f"/api/v1/workflows/{workflow.id}/status",
        headers=actor.headers,
        json={"status": "archived"},
    )
    assert r.status_code == 200, r.text
    assert (await client.post(f"/api/v1/hooks/{trigger.token}", json={})).status_code == 404


async def test_a_body_over_the_limit_is_413(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    _, trigger, _ = await hook(session, settings, verify=False)
    big = b'{"x": "' + b"a" * settings.triggers.webhook_max_body_bytes + b'"}'
    r = await client.post(
        f"/api/v1/hooks/{trigger.token}", content=big, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413


async def test_the_trigger_api_lists_webhook_urls_and_next_fire_times(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    workspace = await make_workspace(session)
    actor = await member(session, settings, workspace, Role.VIEWER)
    editor = await member(session, settings, workspace, Role.EDITOR)
    definition = with_trigger({"kind": "schedule", "cron": "0 9 * * 1", "timezone": "Asia/Tokyo"})
    definition["nodes"].append({"id": "hook", "type": "trigger", "config": {"kind": "webhook"}})
    definition["connections"].append({"source": "hook", "target": "shape"})
    workflow = await published(session, workspace, definition)
    url = f"/api/v1/workflows/{workflow.id}/triggers?next=3"
    r = await client.get(url, headers=editor.headers)
    assert "/api/v1/hooks/wh_" in {t["node_id"]: t for t in r.json()}["hook"]["webhook_url"]
    # The URL runs the workflow: a viewer, who may not run it, is not shown it.
    r = await client.get(url, headers=actor.headers)
    assert r.status_code == 200, r.text
    by_node = {t["node_id"]: t for t in r.json()}
    assert by_node["hook"]["webhook_url"] is None and by_node["hook"]["kind"] == "webhook"
    times = by_node["start"]["next_fire_times"]
    assert len(times) == 3 and all(t.endswith("Z") or t.endswith("+00:00") for t in times)
    # Monday 09:00 in Tokyo is Monday 00:00 UTC.
    assert all(" " not in t and "T00:00:00" in t for t in times)
    one = await client.get(
        f"/api/v1/workflows/{workflow.id}/triggers/{by_node['start']['id']}", headers=actor.headers
    )
    assert one.status_code == 200 and one.json()["kind"] == "schedule"
    # A viewer reads, but may not switch triggers off; another workflow's id is a 404.
    r = await client.post(
        f"/api/v1/workflows/{workflow.id}/triggers/{by_node['start']['id']}/disable",
        headers=actor.headers,
    )
    assert r.status_code == 403
    r = await client.get(
        f"/api/v1/workflows/{workflow.id}/triggers/{uuid.uuid4()}", headers=actor.headers
    )
    assert r.status_code == 404


async def test_signing_secrets_are_bound_to_their_trigger_and_survive_key_rotation(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    from pydantic import SecretStr

    from backend.triggers.service import open_secret, rotate_encryption

    _, trigger, actor = await hook(session, settings, verify=True)
    _, other, _ = await hook(session, settings, verify=True)
    secret = await new_secret(client, trigger, actor)
    await session.refresh(trigger)
    assert trigger.secret_encrypted is not None
    assert open_secret(settings, trigger.id, trigger.secret_encrypted) == secret
    # A ciphertext copied onto another trigger does not open there.
    try:
        open_secret(settings, other.id, trigger.secret_encrypted)
        raise AssertionError("a copied secret opened")
    except ValueError:
        pass
    sealed_before = trigger.secret_encrypted
    rotated = settings.model_copy(
        update={
            "security": settings.security.model_copy(
                update={
                    "encryption_key": SecretStr("a-brand-new-encryption-key-0123456789"),
                    "previous_encryption_keys": [settings.security.encryption_key],
                }
            )
        }
    )
    assert await rotate_encryption(session, rotated) >= 1
    await session.refresh(trigger)
    assert trigger.secret_encrypted != sealed_before
    only_new = rotated.model_copy(
        update={"security": rotated.security.model_copy(update={"previous_encryption_keys": []})}
    )
    assert open_secret(only_new, trigger.id, trigger.secret_encrypted) == secret
