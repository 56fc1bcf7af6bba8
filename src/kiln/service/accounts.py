"""Users, passwords and API keys. Keys are `kiln-…`, shown once, stored as SHA-256, revocable."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from kiln.db.engine import write_transaction
from kiln.db.models import ApiKey, Plan, User, utcnow
from kiln.errors import AuthenticationFailed, InvalidRequest, NotFound

KEY_PREFIX = "kiln-"
_DISPLAY_PREFIX_LEN = 14  # "kiln-" + 9 characters: enough to name a key, useless to guess it
_NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_hasher = PasswordHasher()


@dataclass(frozen=True)
class Account:
    """Who is calling: the user and their plan's name, as the rest of Kiln sees them."""

    user_id: str
    name: str
    plan_name: str
    is_admin: bool


@dataclass(frozen=True)
class KeyInfo:
    id: str
    prefix: str
    user_name: str
    label: str | None
    created_at: dt.datetime
    revoked_at: dt.datetime | None


def _account(user: User) -> Account:
    return Account(user_id=user.id, name=user.name, plan_name=user.plan_name, is_admin=user.is_admin)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_user(
    factory: sessionmaker[Session],
    name: str,
    plan: str,
    *,
    is_admin: bool = False,
    password: str | None = None,
) -> Account:
    if not _NAME_RE.match(name):
        raise InvalidRequest("user names are 1–64 letters, digits or . _ @ -", param="name")
    if password is not None and len(password) < 8:
        raise InvalidRequest("passwords need at least 8 characters", param="password")
    password_hash = _hasher.hash(password) if password else None  # slow on purpose: outside the lock
    try:
        with write_transaction(factory) as session:
            if session.get(Plan, plan) is None:
                raise NotFound(f"no plan named {plan!r}", param="plan")
            user = User(
                name=name,
                plan_name=plan,
                is_admin=is_admin,
                password_hash=password_hash,
            )
            session.add(user)
            session.flush()
            return _account(user)
    except IntegrityError:
        raise InvalidRequest(f"a user named {name!r} already exists", param="name") from None


def get_user(factory: sessionmaker[Session], name: str) -> Account:
    with factory() as session:
        user = session.scalar(select(User).where(User.name == name))
        if user is None:
            raise NotFound(f"no user named {name!r}", param="user")
        return _account(user)


def get_user_by_id(factory: sessionmaker[Session], user_id: str) -> Account | None:
    with factory() as session:
        user = session.get(User, user_id)
        return _account(user) if user else None


def list_users(factory: sessionmaker[Session]) -> list[Account]:
    with factory() as session:
        return [_account(u) for u in session.scalars(select(User).order_by(User.name))]


def set_plan(factory: sessionmaker[Session], name: str, plan: str) -> Account:
    with write_transaction(factory) as session:
        user = session.scalar(select(User).where(User.name == name))
        if user is None:
            raise NotFound(f"no user named {name!r}", param="user")
        if session.get(Plan, plan) is None:
            raise NotFound(f"no plan named {plan!r}", param="plan")
        user.plan_name = plan
        session.flush()
        return _account(user)


def set_password(factory: sessionmaker[Session], name: str, password: str) -> None:
    if len(password) < 8:
        raise InvalidRequest("passwords need at least 8 characters", param="password")
    password_hash = _hasher.hash(password)
    with write_transaction(factory) as session:
        user = session.scalar(select(User).where(User.name == name))
        if user is None:
            raise NotFound(f"no user named {name!r}", param="user")
        user.password_hash = password_hash


def verify_password(factory: sessionmaker[Session], name: str, password: str) -> Account | None:
    """The account if `password` is right, else None (same answer for unknown users)."""
    with factory() as session:
        user = session.scalar(select(User).where(User.name == name))
        if user is None or not user.password_hash:
            _hasher.hash(password)  # spend the same time either way
            return None
        try:
            _hasher.verify(user.password_hash, password)
        except (VerificationError, InvalidHashError):
            return None
        return _account(user)


def create_key(factory: sessionmaker[Session], user_name: str, label: str | None = None) -> tuple[str, KeyInfo]:
    """A new API key for `user_name`: returns the key itself (shown once) and its record."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with write_transaction(factory) as session:
        user = session.scalar(select(User).where(User.name == user_name))
        if user is None:
            raise NotFound(f"no user named {user_name!r}", param="user")
        row = ApiKey(user_id=user.id, prefix=key[:_DISPLAY_PREFIX_LEN], key_hash=hash_key(key), label=label)
        session.add(row)
        session.flush()
        return key, _key_info(row, user.name)


def _key_info(row: ApiKey, user_name: str) -> KeyInfo:
    return KeyInfo(
        id=row.id,
        prefix=row.prefix,
        user_name=user_name,
        label=row.label,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def list_keys(factory: sessionmaker[Session], user_name: str | None = None) -> list[KeyInfo]:
    with factory() as session:
        query = select(ApiKey, User.name).join(User).order_by(ApiKey.created_at)
        if user_name is not None:
            query = query.where(User.name == user_name)
        return [_key_info(row, name) for row, name in session.execute(query)]


def revoke_key(factory: sessionmaker[Session], prefix: str, *, user_id: str | None = None) -> KeyInfo:
    """Revoke the one key whose prefix starts with `prefix` (owned by `user_id`, when given)."""
    if len(prefix) < 8:
        raise InvalidRequest("give at least 8 characters of the key", param="key")
    with write_transaction(factory) as session:
        query = select(ApiKey).where(ApiKey.prefix.startswith(prefix[:_DISPLAY_PREFIX_LEN], autoescape=True))
        if user_id is not None:
            query = query.where(ApiKey.user_id == user_id)
        rows = list(session.scalars(query))
        if len(prefix) > _DISPLAY_PREFIX_LEN:
            rows = [r for r in rows if r.key_hash == hash_key(prefix)]
        if not rows:
            raise NotFound("no such key", param="key")
        if len(rows) > 1:
            raise InvalidRequest("that prefix names several keys; give more of it", param="key")
        row = rows[0]
        if row.revoked_at is None:
            row.revoked_at = utcnow()
        session.flush()
        return _key_info(row, row.user.name)


def authenticate_key(factory: sessionmaker[Session], key: str) -> Account:
    """The account owning `key`, or AuthenticationFailed (unknown, malformed or revoked)."""
    if not key.startswith(KEY_PREFIX):
        raise AuthenticationFailed("Incorrect API key provided. Kiln keys start with 'kiln-'.")
    with factory() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
        if row is None or row.revoked_at is not None:
            raise AuthenticationFailed("Incorrect API key provided, or the key was revoked.")
        return _account(row.user)
