"""The chat's tables and rules on SQLite and PostgreSQL: scoped to their owner, migrated by 0003."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from kiln.config import DEFAULT_PLANS
from kiln.db.engine import make_engine, make_session_factory
from kiln.db.migrate import downgrade, upgrade
from kiln.db.models import Job
from kiln.errors import InvalidRequest, NotFound
from kiln.service import accounts
from kiln.service.plans import ensure_plans
from kiln.web import conversations


@pytest.fixture
def factory(empty_database_url: str) -> Iterator[Any]:
    upgrade(empty_database_url)
    engine = make_engine(empty_database_url)
    factory = make_session_factory(engine)
    ensure_plans(factory, DEFAULT_PLANS)
    yield factory
    engine.dispose()


def job_for(factory: Any, user_id: str, status: str = "queued") -> str:
    with factory.begin() as session:
        job = Job(
            user_id=user_id,
            plan_name="free",
            status=status,
            model="fake",
            prompt="p",
            width=64,
            height=64,
            steps=4,
            guidance_scale=1.0,
            seed=1,
        )
        session.add(job)
        session.flush()
        return job.id


def test_conversations_belong_to_their_owner(factory: Any) -> None:
    ann = accounts.create_user(factory, "ann", "free")
    bob = accounts.create_user(factory, "bob", "free")
    chat = conversations.create_conversation(factory, ann.user_id, "a red   circle\n" + "x" * 200)
    assert chat.title.startswith("a red circle x") and chat.title.endswith("…") and len(chat.title) == 80
    job = job_for(factory, ann.user_id)
    view = conversations.add_message(factory, ann.user_id, chat.id, text="a red circle", job_id=job)
    assert view.status == "queued" and view.pending

    assert [c.id for c in conversations.list_conversations(factory, ann.user_id)] == [chat.id]
    assert conversations.list_conversations(factory, bob.user_id) == []
    with pytest.raises(NotFound):
        conversations.thread(factory, bob.user_id, chat.id)
    with pytest.raises(NotFound):  # nor can one post into it, or attach someone else's job
        conversations.add_message(
            factory, bob.user_id, chat.id, text="hi", job_id=job_for(factory, bob.user_id)
        )
    mine = conversations.create_conversation(factory, bob.user_id, "mine")
    with pytest.raises(NotFound):
        conversations.add_message(factory, bob.user_id, mine.id, text="hi", job_id=job)
    with pytest.raises(InvalidRequest):
        conversations.add_message(factory, ann.user_id, chat.id, text="  ", job_id=job)

    [message] = conversations.thread(factory, ann.user_id, chat.id)
    assert (message.text, message.job_id, message.image_ids) == ("a red circle", job, ())


def test_sessions_end_on_sign_out_expiry_and_a_new_password(factory: Any) -> None:
    from kiln.web import session_store

    ann = accounts.create_user(factory, "ann", "free", password="first password")
    token = session_store.open_session(factory, ann.user_id, max_age_s=3600)
    other = session_store.open_session(factory, ann.user_id, max_age_s=3600)
    assert session_store.session_owner(factory, token) == ann
    assert session_store.session_owner(factory, token + "x") is None
    session_store.close_session(factory, token)
    assert session_store.session_owner(factory, token) is None
    assert session_store.session_owner(factory, other) == ann  # signing out ends one session only
    accounts.set_password(factory, "ann", "second password")
    assert session_store.session_owner(factory, other) is None
    expired = session_store.open_session(factory, ann.user_id, max_age_s=-1)
    assert session_store.session_owner(factory, expired) is None


def test_the_web_migrations_go_down_and_up(empty_database_url: str) -> None:
    upgrade(empty_database_url)
    downgrade(empty_database_url, "0001")
    upgrade(empty_database_url)
