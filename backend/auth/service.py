"""Sign-in with one-time codes, sessions with rotating refresh tokens, and API keys."""

from __future__ import annotations

import ipaddress
import secrets
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from backend.activity.service import record
from backend.auth import tokens
from backend.auth.dependencies import API_KEY_PREFIX, Principal, WorkspaceAccess
from backend.auth.permissions import Role
from backend.auth.schemas import ApiKeyCreate, TokenPair, UserRead, UserUpdate
from backend.config import AuthSettings, Settings
from backend.kit.crypto import equal, hash_token, keyed_hash, new_code, new_token
from backend.kit.db import UnitOfWork
from backend.kit.errors import NotFound, PermissionDenied, RateLimited, Unauthenticated
from backend.kit.mail import send_mail
from backend.kit.middleware import request_meta
from backend.kit.ratelimit import RateLimiter
from backend.models import ApiKey, AuthSession, OtpCode, User
from backend.workspaces.service import create_personal_workspace

# A rotated refresh token presented again this soon is a race of the owner's own
# clients, not theft: refused, but the session stands.
REFRESH_GRACE = timedelta(seconds=30)
# A network the address signed in from this recently counts as its owner's.
KNOWN_NETWORK_AGE = timedelta(days=90)


def _now() -> datetime:
    return datetime.now(UTC)


def _code_hash(settings: Settings, email: str, code: str) -> str:
    return keyed_hash(settings.security.secret_key.get_secret_value(), "otp", email, code)


def network_of(ip: str | None) -> str:
    """The unit sign-in counts clients by: an IPv4 address, or an IPv6 /64 (one host
    often holds a whole /64, so single IPv6 addresses would be free to mint)."""
    try:
        address = ipaddress.ip_address(ip or "")
    except ValueError:
        return ip or "-"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _code_ids(settings: Settings, email: str, network: str) -> tuple[uuid.UUID, uuid.UUID]:
    """The id range of the codes one network asked for one address. A code's id starts
    with a keyed tag of both, so a code is bound to the network that asked for it (only
    it can use, guess at or replace the code) without a column to say so."""
    secret = settings.security.secret_key.get_secret_value()
    tag = bytes.fromhex(keyed_hash(secret, "otp-network", email, network)[:16])
    return uuid.UUID(bytes=tag + bytes(8)), uuid.UUID(bytes=tag + b"\xff" * 8)


def lockout_s(auth: AuthSettings, failures: int) -> int:
    """How long an address is locked after its `failures`-th wrong code: not at all for
    the first few (typos), then base, 2 x base, 4 x base ..., never longer than the cap."""
    beyond = failures - auth.otp_lockout_free_failures
    if beyond <= 0:
        return 0
    return min(auth.otp_lockout_base_s << min(beyond - 1, 32), auth.otp_lockout_max_s)


async def _signed_in_from(session: AsyncSession, email: str, network: str) -> bool:
    """Whether the address's owner opened a session from this network lately: someone
    elsewhere who merely knows the address cannot come from there."""
    ips = await session.scalars(
        select(AuthSession.ip)
        .join(User, User.id == AuthSession.user_id)
        .where(
            User.email == email,
            AuthSession.ip.is_not(None),
            AuthSession.created_at > _now() - KNOWN_NETWORK_AGE,
        )
        .order_by(AuthSession.created_at.desc())
        .limit(100)
    )
    return any(network_of(ip) == network for ip in ips)


async def request_otp(
    uow: UnitOfWork, settings: Settings, limiter: RateLimiter, *, email: str, purpose: str
) -> int:
    """Send a fresh code. The answer is the same whether or not the address is known."""
    email = email.lower()
    network = network_of(request_meta.get().ip)
    limit = settings.auth.otp_request_limit
    await limiter.hit(limit, "otp-request-ip", network, what="code requests")
    # Per address *and* network: requests from elsewhere cannot use up the owner's.
    await limiter.hit(limit, "otp-request-email", email, network, what="code requests")
    session = uow.session
    try:
        await limiter.hit(
            settings.auth.otp_address_request_limit, "otp-request-address", email,
            what="code requests",
        )  # fmt: skip
    except RateLimited:
        if not await _signed_in_from(session, email, network):
            raise
    now = _now()
    low, high = _code_ids(settings, email, network)
    # A new code kills this network's older ones, never another network's: asking for a
    # code for someone else's address does not end the code in their hands.
    await session.execute(
        update(OtpCode)
        .where(OtpCode.email == email, OtpCode.id.between(low, high), OtpCode.consumed_at.is_(None))
        .values(consumed_at=now)
    )
    code = new_code()
    ttl = settings.auth.otp_ttl_s
    session.add(
        OtpCode(
            id=uuid.UUID(bytes=low.bytes[:8] + secrets.token_bytes(8)),
            # The clock sign-ins are stamped with (last_login_at), which the lock-out
            # compares it to.
            created_at=now,
            email=email,
            purpose=purpose,
            code_hash=_code_hash(settings, email, code),
            expires_at=now + timedelta(seconds=ttl),
        )
    )
    await session.flush()
    send_mail(
        uow,
        settings,
        to=email,
        # Never the code itself: the subject shows in Flower (argsrepr) and mail logs.
        subject="Your Orchestration Studio sign-in code",
        body=(
            f"Your sign-in code is {code}.\n\n"
            f"It works once and expires in {ttl // 60} minutes. "
            "If you did not ask for it, ignore this message."
        ),
    )
    return ttl


async def _failures(
    session: AsyncSession,
    settings: Settings,
    *,
    email: str,
    network: str,
    otp: OtpCode,
    now: datetime,
) -> tuple[int, bool]:
    """The address's wrong codes since its last sign-in (within the window), and whether
    this network sent any of them to an earlier code of its own."""
    since = now - timedelta(seconds=settings.auth.otp_lockout_window_s)
    last_login = await session.scalar(select(User.last_login_at).where(User.email == email))
    if last_login is not None and last_login > since:
        since = last_login
    low, high = _code_ids(settings, email, network)
    earlier_own = and_(OtpCode.id.between(low, high), OtpCode.id != otp.id)
    total, dirty = (
        await session.execute(
            select(
                func.coalesce(func.sum(OtpCode.attempts), 0),
                func.coalesce(func.bool_or(earlier_own), False),
            ).where(OtpCode.email == email, OtpCode.created_at > since, OtpCode.attempts > 0)
        )
    ).one()
    return int(total), bool(dirty)


async def _through_lockout(
    session: AsyncSession,
    settings: Settings,
    limiter: RateLimiter,
    *,
    email: str,
    network: str,
    failures: int,
    dirty: bool,
) -> bool:
    """Refuse while the address is locked out, except for a network that sent it no
    wrong code before its current one: the owner's fresh code. Answers whether this
    attempt gets past a lock on the shared allowance (which a wrong code then spends)."""
    lock = lockout_s(settings.auth, failures)
    if not lock:
        return False
    what = "wrong codes for this address"
    try:
        # The lock is one moving-window slot per step length, spent by the wrong code
        # that started it: it lasts `lock` seconds from that code.
        await limiter.check(f"1 per {lock} seconds", "otp-lockout", email, what=what)
        return False
    except RateLimited as locked:
        if dirty:
            raise
        if await _signed_in_from(session, email, network):
            return False
        try:
            await limiter.check(
                settings.auth.otp_lockout_bypass_limit, "otp-lockout-bypass", email, what=what
            )
        except RateLimited as spent:
            # Whichever opens first: the lock lapsing or the allowance freeing up.
            raise min(locked, spent, key=lambda e: e.retry_after_s) from None
        return True


async def verify_otp(
    uow: UnitOfWork, settings: Settings, limiter: RateLimiter, *, email: str, code: str
) -> TokenPair:
    email = email.lower()
    network = network_of(request_meta.get().ip)
    await limiter.hit(
        settings.auth.otp_verify_limit, "otp-verify-ip", network, what="sign-in attempts"
    )
    session = uow.session
    # One verification per address at a time: each reads the lock-out and then spends
    # it, and parallel guesses must not all find it open.
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": f"otp:{email}"}
    )
    now = _now()
    low, high = _code_ids(settings, email, network)
    otp = await session.scalar(
        select(OtpCode)
        .where(
            OtpCode.email == email,
            OtpCode.id.between(low, high),
            OtpCode.consumed_at.is_(None),
            OtpCode.expires_at > now,
        )
        .order_by(OtpCode.created_at.desc())
        .limit(1)
        .with_for_update()
    )
    if otp is None:
        raise Unauthenticated("invalid or expired code")
    failures, dirty = await _failures(
        session, settings, email=email, network=network, otp=otp, now=now
    )
    bypass = await _through_lockout(
        session, settings, limiter, email=email, network=network, failures=failures, dirty=dirty
    )
    if not equal(otp.code_hash, _code_hash(settings, email, code)):
        otp.attempts += 1
        if otp.attempts >= settings.auth.otp_max_attempts:
            otp.consumed_at = now
        lock = lockout_s(settings.auth, failures + 1)
        if lock:
            await limiter.spend(f"1 per {lock} seconds", "otp-lockout", email)
        if bypass:
            await limiter.spend(settings.auth.otp_lockout_bypass_limit, "otp-lockout-bypass", email)
        # keep_changes: the failed attempt is counted even though the request fails.
        raise Unauthenticated("invalid or expired code", keep_changes=True)
    otp.consumed_at = now

    user = await session.scalar(select(User).where(User.email == email))
    if user is None:
        user = User(email=email)
        session.add(user)
        await session.flush()
        await create_personal_workspace(session, user)
        record(
            session,
            None,
            user_id=user.id,
            action="auth.signup",
            resource_type="user",
            resource_id=user.id,
        )
    elif not user.is_active:
        raise Unauthenticated("account disabled")
    user.last_login_at = now
    pair = await _open_session(uow, settings, user)
    record(session, None, user_id=user.id, action="auth.login", resource_type="session")
    return pair


async def _open_session(uow: UnitOfWork, settings: Settings, user: User) -> TokenPair:
    meta = request_meta.get()
    auth_session = AuthSession(
        id=uuid.uuid4(),
        user_id=user.id,
        refresh_token_hash="",
        ip=meta.ip,
        user_agent=meta.user_agent,
        expires_at=_now() + timedelta(seconds=settings.auth.refresh_token_ttl_s),
    )
    refresh = tokens.issue(settings, user_id=user.id, session_id=auth_session.id, type_="refresh")
    auth_session.refresh_token_hash = hash_token(refresh)
    uow.session.add(auth_session)
    await uow.session.flush()
    return _pair(settings, user, auth_session.id, refresh)


def _pair(settings: Settings, user: User, session_id: uuid.UUID, refresh: str) -> TokenPair:
    return TokenPair(
        access_token=tokens.issue(settings, user_id=user.id, session_id=session_id, type_="access"),
        refresh_token=refresh,
        expires_in=settings.auth.access_token_ttl_s,
        user=UserRead.model_validate(user),
    )


async def refresh(uow: UnitOfWork, settings: Settings, refresh_token: str) -> TokenPair:
    claims = tokens.decode(settings, refresh_token, expected="refresh")
    session = uow.session
    auth_session = await session.get(AuthSession, claims.session_id, with_for_update=True)
    now = _now()
    if (
        auth_session is None
        or auth_session.user_id != claims.user_id
        or auth_session.revoked_at is not None
        or auth_session.expires_at <= now
    ):
        raise Unauthenticated("session revoked or expired")
    presented = hash_token(refresh_token)
    if (
        auth_session.previous_refresh_token_hash is not None
        and auth_session.rotated_at is not None
        and equal(auth_session.previous_refresh_token_hash, presented)
        and now - auth_session.rotated_at < REFRESH_GRACE
    ):
        raise Unauthenticated("refresh token was just rotated; use the newest one")
    if not equal(auth_session.refresh_token_hash, presented):
        # A valid token that was already rotated: someone else holds a copy. End the
        # whole session so the thief's tokens die with the owner's.
        auth_session.revoked_at = now
        auth_session.revoked_reason = "refresh_token_reuse"
        record(
            session, None, user_id=auth_session.user_id, action="auth.refresh_reuse",
            resource_type="session", resource_id=auth_session.id,
        )  # fmt: skip
        raise Unauthenticated("refresh token already used; session revoked", keep_changes=True)
    user = await session.get(User, claims.user_id)
    if user is None or not user.is_active:
        raise Unauthenticated("account disabled")
    new_refresh = tokens.issue(
        settings, user_id=user.id, session_id=auth_session.id, type_="refresh"
    )
    auth_session.previous_refresh_token_hash = auth_session.refresh_token_hash
    auth_session.refresh_token_hash = hash_token(new_refresh)
    auth_session.rotated_at = now
    auth_session.last_activity_at = now
    return _pair(settings, user, auth_session.id, new_refresh)


async def logout(uow: UnitOfWork, principal: Principal) -> None:
    if principal.session_id is None:
        return
    auth_session = await uow.session.get(AuthSession, principal.session_id)
    if auth_session is not None and auth_session.revoked_at is None:
        auth_session.revoked_at = _now()
        auth_session.revoked_reason = "logout"
    record(
        uow.session,
        principal,
        action="auth.logout",
        resource_type="session",
        resource_id=principal.session_id,
    )


async def update_me(uow: UnitOfWork, principal: Principal, changes: UserUpdate) -> User:
    user = principal.user
    values = changes.model_dump(exclude_unset=True, mode="json")
    for key, value in values.items():
        setattr(user, key, value)
    await uow.session.flush()
    record(
        uow.session,
        principal,
        action="user.update",
        resource_type="user",
        resource_id=user.id,
        details={"fields": sorted(values)},
    )
    return user


# API keys ------------------------------------------------------------------------------


async def create_api_key(
    uow: UnitOfWork, access: WorkspaceAccess, data: ApiKeyCreate
) -> tuple[ApiKey, str]:
    if not access.role.at_least(data.role):
        raise PermissionDenied(
            f"a {access.role.value} cannot create a key with role {data.role.value}", field="role"
        )
    key = new_token(API_KEY_PREFIX)
    api_key = ApiKey(
        workspace_id=access.workspace.id,
        created_by=access.user.id,
        name=data.name,
        prefix=key[:12],
        key_hash=hash_token(key),
        role=data.role.value,
        expires_at=_now() + timedelta(days=data.expires_in_days) if data.expires_in_days else None,
    )
    uow.session.add(api_key)
    await uow.session.flush()
    record(
        uow.session,
        access.principal,
        workspace_id=access.workspace.id,
        action="api_key.create",
        resource_type="api_key",
        resource_id=api_key.id,
        details={"name": data.name, "role": data.role.value},
    )
    return api_key, key


async def list_api_keys(uow: UnitOfWork, access: WorkspaceAccess) -> Sequence[ApiKey]:
    rows = await uow.session.scalars(
        select(ApiKey)
        .where(ApiKey.workspace_id == access.workspace.id)
        .order_by(ApiKey.created_at.desc())
    )
    return rows.all()


async def revoke_api_key(uow: UnitOfWork, access: WorkspaceAccess, key_id: uuid.UUID) -> None:
    api_key = await uow.session.scalar(
        select(ApiKey).where(ApiKey.id == key_id, ApiKey.workspace_id == access.workspace.id)
    )
    if api_key is None:
        raise NotFound("API key not found")
    if not access.role.at_least(Role(api_key.role)):
        raise PermissionDenied("cannot revoke a key with a higher role than yours")
    if api_key.revoked_at is None:
        api_key.revoked_at = _now()
        record(
            uow.session,
            access.principal,
            workspace_id=access.workspace.id,
            action="api_key.revoke",
            resource_type="api_key",
            resource_id=api_key.id,
        )
