"""The browser-session lookups the API's auth dependency uses: sync and async forms, same answers."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.requests import Request
from web_helpers import run_async

from kiln.service import accounts
from kiln.web import session_store
from kiln.web.session import (
    CsrfRejected,
    session_account,
    session_account_async,
    session_user,
    session_user_async,
)


class RecordingFactory:
    """The session factory, noting the thread of every database session opened through it."""

    def __init__(self, factory: Any) -> None:
        self.factory, self.threads = factory, []

    def __call__(self) -> Any:
        self.threads.append(threading.get_ident())
        return self.factory()


def request(db: Any, token: str | None, method: str = "GET", csrf_header: str | None = None) -> Request:
    headers = [(b"x-csrf-token", csrf_header.encode())] if csrf_header else []
    scope = {
        "type": "http",
        "method": method,
        "path": "/v1/usage",
        "headers": headers,
        "session": {"sid": token, "csrf": "the-token"} if token else {},
        "app": SimpleNamespace(state=SimpleNamespace(kiln=SimpleNamespace(db=db))),
    }
    return Request(scope)


@pytest.fixture
def signed_in(db: Any) -> tuple[RecordingFactory, str, str]:
    account = accounts.create_user(db, "sam", "free")
    token = session_store.open_session(db, account.user_id, 3600)
    return RecordingFactory(db), token, account.user_id


def test_the_async_forms_read_the_database_off_the_loop(signed_in: Any) -> None:
    factory, token, user_id = signed_in

    async def main() -> tuple[Any, Any, int]:
        req = request(factory, token)
        first = await session_account_async(req)
        again = await session_user_async(req)  # one lookup per request
        return first, again, threading.get_ident()

    first, again, loop_thread = run_async(main())
    assert first.user_id == user_id and again is first
    assert len(factory.threads) == 1 and factory.threads[0] != loop_thread


def test_sync_and_async_give_the_same_answers(signed_in: Any) -> None:
    factory, token, user_id = signed_in
    assert session_account(request(factory, token)).user_id == user_id
    assert session_user(request(factory, "not-a-session")) is None
    assert session_account(request(factory, None)) is None
    assert run_async(session_account_async(request(factory, None))) is None
    assert run_async(session_user_async(request(factory, "not-a-session"))) is None
    posted = request(factory, token, "POST", csrf_header="the-token")
    assert run_async(session_account_async(posted)).user_id == user_id
    for check in (session_account, session_account_async):
        with pytest.raises(CsrfRejected):
            result = check(request(factory, token, "POST"))
            if asyncio.iscoroutine(result):
                run_async(result)
