"""Each user's webhook signing secret: `whsec_` and the base64 of 32 random bytes (Standard
Webhooks allows 24–64), made on first read, replaced by a rotation. Deliveries are signed with the
secret current when they are sent, so after a rotation no delivery is signed with the old one."""

from __future__ import annotations

import base64
import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from kiln.db.engine import write_transaction
from kiln.db.models import utcnow
from kiln.db.webhook_models import WebhookSecret

SECRET_BYTES = 32
PREFIX = "whsec_"


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def _insert_if_missing(session: Session, user_id: str, secret: str) -> None:
    table = WebhookSecret.__table__
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    session.execute(insert(table).values(user_id=user_id, secret=secret, created_at=utcnow())
                    .on_conflict_do_nothing(index_elements=["user_id"]))


def secrets_of(session: Session, user_ids: set[str]) -> dict[str, str]:
    """The users' current secrets inside the caller's (write) transaction, made for those who have none."""
    found = {user_id: secret for user_id, secret in session.execute(
        select(WebhookSecret.user_id, WebhookSecret.secret).where(WebhookSecret.user_id.in_(user_ids)))}
    missing = user_ids - found.keys()
    for user_id in missing:
        _insert_if_missing(session, user_id, new_secret())
    if missing:
        found.update((user_id, secret) for user_id, secret in session.execute(
            select(WebhookSecret.user_id, WebhookSecret.secret).where(WebhookSecret.user_id.in_(missing))))
    return found


def _current(session: Session, user_id: str) -> str | None:
    return session.scalar(select(WebhookSecret.secret).where(WebhookSecret.user_id == user_id))


def get_secret(db: sessionmaker[Session], user_id: str) -> str:
    """The user's current secret, made now if they have none (two first reads agree on one)."""
    with db() as session:
        found = _current(session, user_id)
    if found is not None:
        return found
    with write_transaction(db) as session:
        _insert_if_missing(session, user_id, new_secret())
        stored = _current(session, user_id)
    assert stored is not None
    return stored


def rotate_secret(db: sessionmaker[Session], user_id: str) -> str:
    """A new secret replaces the user's old one, which signs nothing from now on."""
    secret = new_secret()
    with write_transaction(db) as session:
        replaced = session.execute(
            update(WebhookSecret).where(WebhookSecret.user_id == user_id)
            .values(secret=secret, created_at=utcnow()).execution_options(synchronize_session=False)
        ).rowcount
        if replaced == 0:
            _insert_if_missing(session, user_id, secret)
        stored = _current(session, user_id)
    assert stored is not None
    return stored
