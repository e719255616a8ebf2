"""notify nodes in real runs: email through the test SMTP server (aiosmtpd), webhooks to
a receiver on 127.0.0.1, signed with a webhook_secret credential and checked with
backend.kit.signing.verify; transient answers retried, permanent ones not."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.credentials.schemas import CredentialCreate
from backend.kit.signing import SignatureError, new_secret, verify
from backend.models import Workspace
from tests.support.engine import CredentialMaker, Enqueued, error_of, start, state
from tests.support.mail import Mailbox, body_of
from tests.support.procs import free_port
from tests.support.webhooks import Receiver
from workers.engine.runner import Runner


def notify(node_id: str = "tell", **config: Any) -> dict[str, Any]:
    retry = config.pop("retry", None)
    node: dict[str, Any] = {
        "id": node_id,
        "type": "action",
        "config": {"kind": "notify", **config},
    }
    if retry is not None:
        node["retry"] = retry
    return node


def one(node: dict[str, Any]) -> dict[str, Any]:
    return {
        "nodes": [{"id": "start", "type": "trigger", "config": {"kind": "manual"}}, node],
        "connections": [{"source": "start", "target": node["id"]}],
    }


QUICK_RETRY = {"max_retries": 2, "backoff_s": [0.01]}


# Email ------------------------------------------------------------------------------------


async def test_email_reaches_the_smtp_server_with_rendered_fields(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    mailbox: Mailbox,
) -> None:
    to = f"ops-{uuid.uuid4().hex[:8]}@example.com"
    d = one(
        notify(
            channel="email",
            to="{{ trigger.who }}",
            subject="Run {{ execution.id }}\nfinished",
            message="Total: {{ trigger.total }}",
        )
    )
    before = mailbox.count()
    execution_id = await start(maker, workspace, d, {"who": to, "total": 42})
    assert await runner.execute(execution_id) == "completed"
    _, rows = await state(maker, execution_id)
    # Delivered before the node completed: the message is already in the mailbox.
    msg = mailbox.wait_for(to, after=before, timeout_s=1)
    assert body_of(msg).strip() == "Total: 42"
    assert msg["Subject"] == f"Run {execution_id} finished"
    output = rows["tell"].output
    assert output["channel"] == "email"
    assert output["to"] == [to]
    assert output["message_id"] == msg["Message-ID"]


async def test_email_to_several_recipients_and_a_bad_address_is_permanent(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    mailbox: Mailbox,
) -> None:
    a, b = (f"{n}-{uuid.uuid4().hex[:8]}@example.com" for n in ("a", "b"))
    execution_id = await start(
        maker, workspace, one(notify(channel="email", to=f"{a}, Bee <{b}>", message="hi"))
    )
    assert await runner.execute(execution_id) == "completed"
    _, rows = await state(maker, execution_id)
    assert rows["tell"].output["to"] == [a, b]
    assert mailbox.wait_for(f"{a}, {b}", timeout_s=1)

    d = one(notify(channel="email", to="{{ trigger.who }}", message="hi", retry=QUICK_RETRY))
    execution_id = await start(maker, workspace, d, {"who": "not-an-address"})
    assert await runner.execute(execution_id) == "failed"
    _, rows = await state(maker, execution_id)
    assert rows["tell"].attempt == 1
    assert error_of(rows["tell"])["class"] == "permanent"
    assert "is not an email address" in error_of(rows["tell"])["message"]


async def test_an_unreachable_mail_server_is_transient_and_retried(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace
) -> None:
    down = runner.settings.smtp.model_copy(update={"port": free_port()})
    runner = Runner(
        runner.settings.model_copy(update={"smtp": down}),
        maker,
        runner.http,
        f"test-{uuid.uuid4().hex[:6]}",
        Enqueued(),
    )
    d = one(notify(channel="email", to="x@example.com", message="hi", retry=QUICK_RETRY))
    execution_id = await start(maker, workspace, d)
    assert await runner.execute(execution_id) == "failed"
    _, rows = await state(maker, execution_id)
    # Three attempts: the first and the policy's two retries.
    assert rows["tell"].attempt == 3
    assert error_of(rows["tell"])["class"] == "connection"
    assert "unreachable" in error_of(rows["tell"])["message"]


# Webhooks ---------------------------------------------------------------------------------


async def test_signed_webhook_verifies_and_carries_the_run(
    add_credential: CredentialMaker,
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    receiver: Receiver,
) -> None:
    secret = new_secret()
    credential_id = await add_credential(workspace, {"type": "webhook_secret", "secret": secret})
    d = one(
        notify(
            channel="webhook",
            url=receiver.base + "/{{ trigger.path }}",
            subject="Daily {{ trigger.kind }}",
            message="{{ trigger.count }} new items",
            credential_id=str(credential_id),
        )
    )
    execution_id = await start(maker, workspace, d, {"path": "ok", "kind": "digest", "count": 3})
    assert await runner.execute(execution_id) == "completed"
    ex, rows = await state(maker, execution_id)
    [delivery] = receiver.to("ok")
    message_id = verify(secret, delivery.headers, delivery.body)
    payload = delivery.json()
    assert isinstance(payload, dict)
    assert payload["execution_id"] == str(execution_id)
    assert payload["workflow_id"] == str(ex.workflow_id)
    assert payload["node_id"] == "tell"
    assert payload["subject"] == "Daily digest"
    assert payload["message"] == "3 new items"
    assert rows["tell"].output == {"channel": "webhook", "status": 200, "message_id": message_id}
    # Signed with this secret only: another one does not verify, and the secret is in
    # neither the node's record nor the request beyond its HMAC.
    with pytest.raises(SignatureError):
        verify(new_secret(), delivery.headers, delivery.body)
    assert secret not in json.dumps([rows["tell"].input, rows["tell"].output])
    assert secret not in json.dumps(delivery.headers) + delivery.body.decode()


async def test_unsigned_webhook_still_carries_a_stable_id(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    receiver: Receiver,
) -> None:
    key = uuid.uuid4().hex[:8]
    d = one(
        notify(
            channel="webhook", url=f"{receiver.base}/flaky/{key}/1", message="m", retry=QUICK_RETRY
        )
    )
    execution_id = await start(maker, workspace, d)
    assert await runner.execute(execution_id) == "completed"
    _, rows = await state(maker, execution_id)
    first, second = receiver.to(f"flaky/{key}/1")
    # A 500 is transient: retried, and the retry is the same message for the receiver.
    assert rows["tell"].attempt == 2
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert rows["tell"].output["message_id"] == first.headers["webhook-id"]
    assert "webhook-signature" not in first.headers


async def test_a_webhook_answering_500_is_retried_then_fails_as_transient(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    receiver: Receiver,
) -> None:
    d = one(
        notify(channel="webhook", url=f"{receiver.base}/status/500", message="m", retry=QUICK_RETRY)
    )
    execution_id = await start(maker, workspace, d)
    assert await runner.execute(execution_id) == "failed"
    _, rows = await state(maker, execution_id)
    assert receiver.hits["status/500"] == 3
    assert rows["tell"].attempt == 3
    assert error_of(rows["tell"])["class"] == "server_error"
    assert error_of(rows["tell"])["message"] == "the webhook answered HTTP 500"


@pytest.mark.parametrize("status", [400, 302])
async def test_a_webhook_answering_400_or_a_redirect_fails_at_once(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    receiver: Receiver,
    status: int,
) -> None:
    path = "status/400" if status == 400 else "redirect"
    d = one(
        notify(channel="webhook", url=f"{receiver.base}/{path}", message="m", retry=QUICK_RETRY)
    )
    execution_id = await start(maker, workspace, d)
    assert await runner.execute(execution_id) == "failed"
    _, rows = await state(maker, execution_id)
    assert receiver.hits[path] == 1
    assert receiver.hits["ok"] == 0  # the redirect was not followed
    assert rows["tell"].attempt == 1
    assert error_of(rows["tell"])["class"] == "permanent"


async def test_a_webhook_to_a_blocked_address_never_leaves(
    runner: Runner, maker: async_sessionmaker[AsyncSession], workspace: Workspace
) -> None:
    d = one(notify(channel="webhook", url="http://169.254.169.254/latest", message="m"))
    execution_id = await start(maker, workspace, d)
    assert await runner.execute(execution_id) == "failed"
    _, rows = await state(maker, execution_id)
    assert rows["tell"].attempt == 1
    assert error_of(rows["tell"])["class"] == "permanent"
    assert "may not reach" in error_of(rows["tell"])["message"]


async def test_a_credential_of_another_type_cannot_sign(
    add_credential: CredentialMaker,
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    receiver: Receiver,
) -> None:
    credential_id = await add_credential(
        workspace, {"type": "bearer", "token": "tok-" + uuid.uuid4().hex}
    )
    d = one(
        notify(
            channel="webhook",
            url=f"{receiver.base}/ok",
            message="m",
            credential_id=str(credential_id),
        )
    )
    execution_id = await start(maker, workspace, d)
    assert await runner.execute(execution_id) == "failed"
    _, rows = await state(maker, execution_id)
    assert "use a webhook_secret credential" in error_of(rows["tell"])["message"]
    assert receiver.hits["ok"] == 0


def test_webhook_secret_credentials_are_checked_on_input() -> None:
    ok = CredentialCreate.model_validate(
        {"name": "hook", "secret": {"type": "webhook_secret", "secret": new_secret()}}
    )
    assert ok.secret.type == "webhook_secret"
    for bad in ("short", "whsec_not*base64*at*all!!"):
        with pytest.raises(ValidationError):
            CredentialCreate.model_validate(
                {"name": "hook", "secret": {"type": "webhook_secret", "secret": bad}}
            )


async def test_each_pass_of_a_loop_is_its_own_webhook_message(
    runner: Runner,
    maker: async_sessionmaker[AsyncSession],
    workspace: Workspace,
    receiver: Receiver,
) -> None:
    body = {"nodes": [notify(channel="webhook", url=f"{receiver.base}/ok", message="{{ item }}")]}
    d = one(
        {
            "id": "each",
            "type": "logic",
            "config": {"kind": "for_each", "items": "trigger.names", "body": body},
        }
    )
    execution_id = await start(maker, workspace, d, {"names": ["ada", "grace", "edsger"]})
    assert await runner.execute(execution_id) == "completed"
    deliveries = receiver.to("ok")
    assert sorted(json.loads(x.body)["message"] for x in deliveries) == ["ada", "edsger", "grace"]
    # Receivers drop repeats by webhook-id: three passes must not look like one.
    assert len({x.headers["webhook-id"] for x in deliveries}) == 3
