"""Users, invites, API keys and worker tokens: creation and bearer-token authentication."""
from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from typing import Optional

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from werkzeug.security import check_password_hash, generate_password_hash

from . import settings
from .db import db
from .errors import ApiError
from .models import ApiKey, Invite, Tier, User, Worker, utcnow

API_KEY_PREFIX = "pgk_"
WORKER_TOKEN_PREFIX = "pgw_"
INVITE_PREFIX = "pgi_"
# Writing last_used_at on every call would turn each request into a write.
LAST_USED_GRANULARITY = dt.timedelta(seconds=60)


MIN_PASSWORD = 8
MAX_EMAIL = 191  # an indexed VARCHAR on utf8mb4


def email_problem(email: str) -> Optional[str]:
    """Say what is wrong with an email address (already stripped and lowered), or None."""
    if "@" not in email or len(email) > MAX_EMAIL:
        return "not an email address"
    return None


def password_problem(password: str) -> Optional[str]:
    """Say what is wrong with a new password, or None."""
    if len(password) < MIN_PASSWORD:
        return f"a password needs at least {MIN_PASSWORD} characters"
    return None


def hash_password(password: str) -> str:
    """Hash a password for storage (werkzeug's salted scrypt)."""
    return generate_password_hash(password)


def password_matches(password_hash: str, password: str) -> bool:
    """Check a password against its stored hash."""
    return check_password_hash(password_hash, password)


def hash_secret(secret: str) -> str:
    """Hash a random bearer secret; 256 random bits need no slow hash, just one-wayness."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret(prefix: str) -> str:
    """Make a bearer secret with a recognisable prefix and 256 random bits."""
    return prefix + secrets.token_urlsafe(32)


def create_user(email: str, password: str, is_admin: bool = False, tier: Optional[str] = None) -> User:
    """Create a user with a hashed password, in the named tier or the default one."""
    with db.begin() as s:
        tier_id = None
        if tier is not None:
            tier_id = s.scalar(select(Tier.id).where(Tier.name == tier))
            if tier_id is None:
                names = ", ".join(s.scalars(select(Tier.name).order_by(Tier.id)))
                raise ValueError(f"no tier named {tier!r} (tiers: {names})")
        return _add_user(s, email, password, is_admin, tier_id)


def _add_user(s: Session, email: str, password: str, is_admin: bool, tier_id: Optional[int]) -> User:
    """Check the email and password, then add the user inside the caller's transaction."""
    email = email.strip().lower()
    if email_problem(email):
        raise ValueError(f"not an email address: {email!r}")
    if password_problem(password):
        raise ValueError(password_problem(password))
    if s.scalar(select(User.id).where(User.email == email)) is not None:
        raise ValueError(f"a user with email {email} already exists")
    user = User(email=email, password_hash=hash_password(password), is_admin=is_admin, tier_id=tier_id)
    s.add(user)
    try:
        s.flush()
    except IntegrityError:
        # Two sign-ups with one address at once: the unique key lets one through.
        raise ValueError(f"a user with email {email} already exists") from None
    return user


def create_invite(created_by: int, email: str = "", tier_id: Optional[int] = None, days: int = 7) -> str:
    """Create a one-time sign-up invite and return its secret, which is never stored."""
    secret = new_secret(INVITE_PREFIX)
    with db.begin() as s:
        s.add(Invite(token_hash=hash_secret(secret), email=email.strip().lower(), tier_id=tier_id,
                     created_by=created_by, expires_at=utcnow() + dt.timedelta(days=days)))
    return secret


def _usable(invite: Optional[Invite]) -> bool:
    return invite is not None and invite.used_at is None and invite.expires_at > utcnow()


def check_invite(secret: str) -> Optional[Invite]:
    """Return the unused, unexpired invite with this secret, if any."""
    with db.read() as s:
        invite = s.scalar(select(Invite).where(Invite.token_hash == hash_secret(secret)))
    return invite if _usable(invite) else None


def sign_up(email: str, password: str, invite_secret: Optional[str]) -> User:
    """Create a user from the sign-up form, spending the invite if one is given."""
    with db.begin() as s:
        if not invite_secret:
            return _add_user(s, email, password, False, None)
        # Locked, so one invite makes one account however many forms race it.
        invite = s.scalar(select(Invite).where(Invite.token_hash == hash_secret(invite_secret)).with_for_update())
        if not _usable(invite):
            raise ValueError("this invite is used up or expired; ask for a new one")
        if invite.email and invite.email != email.strip().lower():
            raise ValueError(f"this invite is for {invite.email}")
        user = _add_user(s, email, password, False, invite.tier_id)
        invite.used_at, invite.used_by = utcnow(), user.id
        return user


def find_user(email: str) -> Optional[User]:
    """Return the user with this email, if any."""
    with db.read() as s:
        return s.scalar(select(User).where(User.email == email.strip().lower()))


class TooMany(ValueError):
    """A user already has as many keys or worker tokens as the site allows."""


def _check_room(s: Session, user_id: int, column, revoked, cap: int, what: str) -> None:
    """Refuse one more of a user's keys or tokens past the site's cap, counting under the user's row lock."""
    # The row lock makes two tabs creating the last allowed key at once take turns.
    s.execute(select(User.id).where(User.id == user_id).with_for_update())
    held = s.scalar(select(func.count()).where(column == user_id, revoked.is_(None)))
    if cap and held >= cap:
        raise TooMany(f"you already have {held} {what}, the most this site allows; revoke one you no longer use")


def create_api_key(user_id: int, name: str = "", tavern: bool = False) -> str:
    """Create an API key and return its secret, which is never stored or shown again."""
    secret = new_secret(API_KEY_PREFIX)
    cap = settings.get("max_api_keys_per_user")
    with db.begin() as s:
        _check_room(s, user_id, ApiKey.user_id, ApiKey.revoked_at, cap, "API keys")
        s.add(ApiKey(user_id=user_id, name=name[:100], prefix=secret[:12], key_hash=hash_secret(secret),
                     tavern=tavern))
    return secret


def create_worker_token(user_id: int, name: str = "", shared: bool = False, shared_by: Optional[int] = None) -> str:
    """Create a worker identity and return its token, which is never stored or shown again."""
    secret = new_secret(WORKER_TOKEN_PREFIX)
    cap = settings.get("max_worker_tokens_per_user")
    with db.begin() as s:
        _check_room(s, user_id, Worker.user_id, Worker.revoked_at, cap, "worker tokens")
        s.add(
            Worker(
                user_id=user_id,
                name=name[:100],
                token_prefix=secret[:12],
                token_hash=hash_secret(secret),
                shared=shared,
                shared_by=shared_by if shared else None,
                shared_at=utcnow() if shared else None,
            )
        )
    return secret


def bearer_secret(header: Optional[str]) -> Optional[str]:
    """Pull the secret out of an Authorization header."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def authenticate_api_key(header: Optional[str]) -> ApiKey:
    """Return the live API key named by the header, or raise a 401."""
    secret = bearer_secret(header)
    if secret is None:
        raise ApiError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
            code="missing_api_key",
        )
    digest = hash_secret(secret)
    with db.read() as s:
        key = s.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    # Looked up by the digest itself, so nothing is left to compare.
    if key is None or key.revoked_at is not None:
        # Never echo the key back: it may be a real secret pasted in the wrong place.
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    now = utcnow()
    if key.expires_at is not None and key.expires_at <= now:
        raise ApiError(401, f"This API key expired on {key.expires_at:%Y-%m-%d %H:%M} UTC.", code="expired_api_key")
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_GRANULARITY:
        with db.begin() as s:
            s.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now))
    return key


def authenticate_worker(header: Optional[str]) -> Worker:
    """Return the live worker named by the header, or raise a 401."""
    secret = bearer_secret(header)
    if secret is None:
        raise ApiError(401, "Send the worker token as 'Authorization: Bearer pgw_...'.", code="missing_token")
    with db.read() as s:
        worker = s.scalar(select(Worker).where(Worker.token_hash == hash_secret(secret)))
    if worker is None or worker.revoked_at is not None:
        raise ApiError(401, "Unknown or revoked worker token.", code="invalid_worker_token")
    return worker
