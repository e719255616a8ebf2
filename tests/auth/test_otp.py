"""Sign-in codes end to end: the API commits the code, a real Celery worker mails it to a
real SMTP server on 127.0.0.1, the test reads it from the message and signs in."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.main import create_app
from backend.models import ActivityLog, OtpCode, User, Workspace, WorkspaceMember
from tests.support.asgi import client_for
from tests.support.identity import make_user, unique_email
from tests.support.mail import Mailbox, code_in

pytestmark = [pytest.mark.xdist_group("crossprocess"), pytest.mark.usefixtures("worker_name")]


async def request_code(client: httpx.AsyncClient, mailbox: Mailbox, email: str) -> str:
    before = mailbox.count()
    r = await client.post("/api/v1/auth/request-otp", json={"email": email, "purpose": "login"})
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "expires_in": 300}
    return code_in(mailbox.wait_for(email, after=before))


async def verify(client: httpx.AsyncClient, email: str, code: str) -> httpx.Response:
    return await client.post("/api/v1/auth/verify-otp", json={"email": email, "code": code})


async def test_first_sign_in_creates_the_user_and_a_personal_workspace(
    client: httpx.AsyncClient, mailbox: Mailbox, session: AsyncSession
) -> None:
    email = unique_email("new")
    code = await request_code(client, mailbox, email)
    r = await verify(client, email, code)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 900
    assert body["user"]["email"] == email
    me = await client.get(
        "/api/v1/auth/me", headers={"Authorization": f"Bearer {body['access_token']}"}
    )
    assert me.json()["id"] == body["user"]["id"]

    user = await session.scalar(select(User).where(User.email == email))
    assert user is not None
    personal = await session.scalar(
        select(Workspace)
        .join(WorkspaceMember)
        .where(WorkspaceMember.user_id == user.id, WorkspaceMember.role == "owner")
    )
    assert personal is not None
    assert personal.is_personal
    actions = set(
        await session.scalars(select(ActivityLog.action).where(ActivityLog.user_id == user.id))
    )
    assert {"auth.signup", "auth.login", "workspace.create"} <= actions


async def test_the_code_is_never_in_the_subject(
    client: httpx.AsyncClient, mailbox: Mailbox
) -> None:
    # The subject travels in clear (Flower shows it as the task's argsrepr).
    email = unique_email("subject")
    before = mailbox.count()
    code = await request_code(client, mailbox, email)
    message = mailbox.wait_for(email, after=before)
    assert code not in message["Subject"]


async def test_wrong_codes_are_counted_per_address_across_codes(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], mailbox: Mailbox
) -> None:
    # A fresh code brings no fresh guesses: the address's failure budget carries over.
    tight = settings.model_copy(
        update={"auth": settings.auth.model_copy(update={"otp_failure_limit": "3 per day"})}
    )
    async for c in client_for(create_app(tight), sessionmaker):
        email = unique_email("budget")
        code = await request_code(c, mailbox, email)
        wrong = f"{(int(code) + 1) % 1_000_000:06d}"
        assert [(await verify(c, email, wrong)).status_code for _ in range(2)] == [401, 401]
        code = await request_code(c, mailbox, email)
        wrong = f"{(int(code) + 1) % 1_000_000:06d}"
        assert (await verify(c, email, wrong)).status_code == 401
        r = await verify(c, email, code)
        assert r.status_code == 429
        assert "retry-after" in r.headers


async def test_the_database_never_holds_a_code_in_clear(
    client: httpx.AsyncClient, mailbox: Mailbox, session: AsyncSession
) -> None:
    email = unique_email("clear")
    code = await request_code(client, mailbox, email)
    row = (
        (await session.execute(text("SELECT * FROM otp_codes WHERE email = :e"), {"e": email}))
        .mappings()
        .one()
    )
    assert all(code not in str(value) for value in row.values())


async def test_unknown_and_known_addresses_get_the_same_answer(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    known = await make_user(session)
    a = await client.post("/api/v1/auth/request-otp", json={"email": known.email})
    b = await client.post("/api/v1/auth/request-otp", json={"email": unique_email("nobody")})
    assert (
        (a.status_code, a.json())
        == (b.status_code, b.json())
        == (200, {"success": True, "expires_in": 300})
    )


async def test_five_wrong_codes_kill_the_code(client: httpx.AsyncClient, mailbox: Mailbox) -> None:
    email = unique_email("wrong")
    code = await request_code(client, mailbox, email)
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    for _ in range(5):
        r = await verify(client, email, wrong)
        assert r.status_code == 401
        assert r.json()["error"] == "unauthenticated"
    # The right code no longer works either.
    assert (await verify(client, email, code)).status_code == 401


async def test_expired_code_fails(
    client: httpx.AsyncClient, mailbox: Mailbox, session: AsyncSession
) -> None:
    email = unique_email("late")
    code = await request_code(client, mailbox, email)
    await session.execute(
        update(OtpCode)
        .where(OtpCode.email == email)
        .values(expires_at=func.now() - text("interval '1 second'"))
    )
    assert (await verify(client, email, code)).status_code == 401


async def test_codes_are_single_use_and_a_new_one_replaces_the_old(
    client: httpx.AsyncClient, mailbox: Mailbox
) -> None:
    email = unique_email("once")
    first = await request_code(client, mailbox, email)
    second = await request_code(client, mailbox, email)
    if first != second:
        assert (await verify(client, email, first)).status_code == 401
    assert (await verify(client, email, second)).status_code == 200
    assert (await verify(client, email, second)).status_code == 401


@pytest.fixture
async def strict_client(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]
) -> AsyncIterator[httpx.AsyncClient]:
    strict = settings.model_copy(
        update={
            "auth": settings.auth.model_copy(
                update={
                    "otp_request_limit": "2 per 15 minutes",
                    "otp_verify_limit": "3 per 15 minutes",
                }
            )
        }
    )
    async for c in client_for(create_app(strict), sessionmaker):
        yield c


async def test_code_requests_are_rate_limited(strict_client: httpx.AsyncClient) -> None:
    email = unique_email("limit")
    for _ in range(2):
        assert (
            await strict_client.post("/api/v1/auth/request-otp", json={"email": email})
        ).status_code == 200
    r = await strict_client.post("/api/v1/auth/request-otp", json={"email": email})
    assert r.status_code == 429
    assert r.json()["error"] == "rate_limited"
    assert 1 <= int(r.headers["retry-after"]) <= 15 * 60


async def test_verify_attempts_are_rate_limited_per_ip(strict_client: httpx.AsyncClient) -> None:
    statuses = [
        (
            await strict_client.post(
                "/api/v1/auth/verify-otp", json={"email": unique_email("v"), "code": "123456"}
            )
        ).status_code
        for _ in range(4)
    ]
    assert statuses == [401, 401, 401, 429]


async def test_malformed_input_names_the_field(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/v1/auth/request-otp", json={"email": "not-an-email"})
    assert r.status_code == 422
    assert r.json()["fields"][0]["field"] == "email"
    r = await client.post(
        "/api/v1/auth/verify-otp", json={"email": "a@example.com", "code": "12ab56"}
    )
    assert r.status_code == 422
    assert r.json()["fields"][0]["field"] == "code"
