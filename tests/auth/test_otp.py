"""Sign-in codes end to end: the API commits the code, a real Celery worker mails it to a
real SMTP server on 127.0.0.1, the test reads it from the message and signs in."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.service import lockout_s, network_of
from backend.config import AuthSettings, Settings
from backend.main import create_app
from backend.models import ActivityLog, OtpCode, User, Workspace, WorkspaceMember
from tests.support.asgi import client_for, random_ip
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


def other_than(code: str) -> str:
    return f"{(int(code) + 1) % 1_000_000:06d}"


def with_auth(settings: Settings, **changes: Any) -> Settings:
    return settings.model_copy(update={"auth": settings.auth.model_copy(update=changes)})


def on_network(app: FastAPI, ip: str | None = None) -> httpx.AsyncClient:
    """One more client of an app whose lifespan is already running (client_for's), from
    an address of its own: someone else, somewhere else."""
    transport = httpx.ASGITransport(app=app, client=(ip or random_ip(), 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


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


async def test_wrong_codes_from_elsewhere_do_not_lock_the_owner_out(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], mailbox: Mailbox
) -> None:
    # Ten wrong codes from anyone used to lock the address out for a day. (The attacker
    # gets a roomy per-IP allowance here so that only the address's lock-out answers.)
    app = create_app(with_auth(settings, otp_verify_limit="100 per 15 minutes"))
    async for attacker in client_for(app, sessionmaker):
        email = unique_email("target")
        statuses = []
        for _ in range(2):
            wrong = other_than(await request_code(attacker, mailbox, email))
            statuses += [(await verify(attacker, email, wrong)).status_code for _ in range(5)]
        # The guessing network is held even with a fresh code, for a while...
        code = await request_code(attacker, mailbox, email)
        r = await verify(attacker, email, code)
        assert r.status_code == 429
        assert 1 <= int(r.headers["retry-after"]) <= 60
        # ...but the owner, asking for a code of their own from their own network, is not.
        async with on_network(app) as owner:
            code = await request_code(owner, mailbox, email)
            r = await verify(owner, email, code)
            assert r.status_code == 200, r.text
        # Five wrong codes are typos; the sixth locks the address (for a minute) against
        # the network that sent it.
        assert statuses == [401] * 6 + [429] * 4


async def test_nobody_elses_requests_or_wrong_codes_end_the_owners_code(
    app: FastAPI, client: httpx.AsyncClient, mailbox: Mailbox
) -> None:
    email = unique_email("mine")
    code = await request_code(client, mailbox, email)
    async with on_network(app) as other:
        # A code request from elsewhere used to kill the owner's code, and five wrong
        # guesses from elsewhere used to exhaust it.
        wrong = other_than(await request_code(other, mailbox, email))
        assert [(await verify(other, email, wrong)).status_code for _ in range(5)] == [401] * 5
        # Only the network that asked for a code can use it.
        assert (await verify(other, email, code)).status_code == 401
    assert (await verify(client, email, code)).status_code == 200


def test_the_lock_out_starts_after_a_few_typos_doubles_and_is_capped() -> None:
    auth = AuthSettings()
    minutes = [lockout_s(auth, n) // 60 for n in range(1, 15)]
    assert minutes == [0, 0, 0, 0, 0, 1, 2, 4, 8, 16, 32, 60, 60, 60]


async def test_a_guessing_network_waits_out_short_locks_and_a_sign_in_clears_them(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], mailbox: Mailbox
) -> None:
    quick = with_auth(
        settings, otp_lockout_free_failures=2, otp_lockout_base_s=1, otp_lockout_max_s=2
    )
    async for c in client_for(create_app(quick), sessionmaker):
        email = unique_email("backoff")
        wrong = other_than(await request_code(c, mailbox, email))
        assert [(await verify(c, email, wrong)).status_code for _ in range(2)] == [401, 401]
        code = await request_code(c, mailbox, email)
        assert (await verify(c, email, other_than(code))).status_code == 401  # 3rd: 1 s
        r = await verify(c, email, code)
        assert (r.status_code, int(r.headers["retry-after"])) in {(429, 1), (429, 2)}
        await asyncio.sleep(1.1)
        assert (await verify(c, email, other_than(code))).status_code == 401  # 4th: 2 s
        r = await verify(c, email, code)
        assert (r.status_code, int(r.headers["retry-after"])) in {(429, 2), (429, 3)}
        await asyncio.sleep(2.1)
        assert (await verify(c, email, code)).status_code == 200
        # The sign-in wiped the slate: the next wrong code is a typo again, not a lock.
        code = await request_code(c, mailbox, email)
        assert (await verify(c, email, other_than(code))).status_code == 401
        assert (await verify(c, email, code)).status_code == 200


async def test_fresh_networks_share_a_small_allowance_the_owners_own_network_does_not(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], mailbox: Mailbox
) -> None:
    # Fresh networks could otherwise each bring guesses past the lock (a botnet).
    app = create_app(with_auth(settings, otp_lockout_free_failures=1))
    home = random_ip()
    async for owner in client_for(app, sessionmaker, client_ip=home):
        email = unique_email("known")
        assert (await verify(owner, email, await request_code(owner, mailbox, email))).is_success
        async with on_network(app) as attacker:
            for _ in range(2):
                wrong = other_than(await request_code(attacker, mailbox, email))
                assert (await verify(attacker, email, wrong)).status_code == 401
        async with on_network(app) as fresh:
            wrong = other_than(await request_code(fresh, mailbox, email))
            assert (await verify(fresh, email, wrong)).status_code == 401
        async with on_network(app) as fresh:
            code = await request_code(fresh, mailbox, email)
            r = await verify(fresh, email, code)
            assert r.status_code == 429
            assert int(r.headers["retry-after"]) > 60
        code = await request_code(owner, mailbox, email)
        assert (await verify(owner, email, code)).status_code == 200


def test_ipv6_clients_are_counted_by_their_64() -> None:
    # One host usually holds a whole /64: counting single addresses would count nothing.
    assert network_of("2001:db8:1:2::1") == network_of("2001:db8:1:2:ffff::9")
    assert network_of("2001:db8:1:2::1") != network_of("2001:db8:1:3::1")
    assert network_of("::ffff:192.0.2.1") == network_of("192.0.2.1") == "192.0.2.1"
    assert network_of("192.0.2.1") != network_of("192.0.2.2")
    assert network_of(None) == "-"


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


async def test_code_requests_are_rate_limited_per_network(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    app = create_app(with_auth(settings, otp_request_limit="2 per 15 minutes"))
    email = unique_email("limit")
    async for c in client_for(app, sessionmaker):
        for _ in range(2):
            assert (
                await c.post("/api/v1/auth/request-otp", json={"email": email})
            ).status_code == 200
        r = await c.post("/api/v1/auth/request-otp", json={"email": email})
        assert r.status_code == 429
        assert r.json()["error"] == "rate_limited"
        assert 1 <= int(r.headers["retry-after"]) <= 15 * 60
        # Someone else's requests do not use up the owner's.
        async with on_network(app) as owner:
            r = await owner.post("/api/v1/auth/request-otp", json={"email": email})
            assert r.status_code == 200


async def test_code_mails_to_an_address_are_capped_except_from_where_it_signed_in(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], mailbox: Mailbox
) -> None:
    app = create_app(with_auth(settings, otp_address_request_limit="2 per hour"))
    async for owner in client_for(app, sessionmaker):
        email = unique_email("inbox")
        assert (await verify(owner, email, await request_code(owner, mailbox, email))).is_success
        async with on_network(app) as stranger:
            await request_code(stranger, mailbox, email)
        async with on_network(app) as stranger:
            r = await stranger.post("/api/v1/auth/request-otp", json={"email": email})
            assert r.status_code == 429
        assert (await verify(owner, email, await request_code(owner, mailbox, email))).is_success


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
