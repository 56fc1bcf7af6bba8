"""Server-side sessions: the row a signed-in browser's cookie points at.

Signing out deletes the row, so a copied cookie stops working too; a new password (the fingerprint
of its hash changes) ends every session opened with the old one. Rows past their expiry are swept
whenever someone signs in.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from kiln.db.engine import write_transaction
from kiln.db.models import User, utcnow
from kiln.db.web_models import WebSession
from kiln.service.accounts import Account


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _password_fp(password_hash: str | None) -> str:
    return hashlib.sha256((password_hash or "").encode()).hexdigest()[:32]


def open_session(factory: sessionmaker[Session], user_id: str, max_age_s: int) -> str:
    """A new session for `user_id`; returns the token for the cookie (stored only as its hash)."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    with write_transaction(factory) as session:
        session.execute(delete(WebSession).where(WebSession.expires_at < now))
        user = session.get(User, user_id)
        if user is None:
            raise LookupError(user_id)
        session.add(
            WebSession(
                id=_digest(token),
                user_id=user_id,
                password_fp=_password_fp(user.password_hash),
                created_at=now,
                expires_at=now + dt.timedelta(seconds=max_age_s),
            )
        )
    return token


def session_owner(factory: sessionmaker[Session], token: str) -> Account | None:
    """The account of a live session, or None (unknown, expired, signed out, password changed)."""
    with factory() as session:
        row = session.execute(
            select(User, WebSession.password_fp)
            .join(WebSession, WebSession.user_id == User.id)
            .where(WebSession.id == _digest(token), WebSession.expires_at > utcnow())
        ).first()
    if row is None:
        return None
    user, password_fp = row
    if password_fp != _password_fp(user.password_hash):
        return None
    return Account(user_id=user.id, name=user.name, plan_name=user.plan_name, is_admin=user.is_admin)


def close_session(factory: sessionmaker[Session], token: str) -> None:
    with write_transaction(factory) as session:
        session.execute(delete(WebSession).where(WebSession.id == _digest(token)))
