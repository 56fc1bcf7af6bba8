"""Browser sign-in: a signed, HttpOnly, SameSite session cookie and a synchroniser CSRF token.

The cookie holds a random session token (its row lives in the database, see `session_store`) and the
CSRF token. Every state-changing call that a cookie authenticates must carry the CSRF token (form
field `csrf_token` or header `X-CSRF-Token`); API keys need none, since a browser never attaches them
by itself.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import Receive, Scope, Send

from kiln.config import Settings
from kiln.errors import KilnError
from kiln.service.accounts import Account
from kiln.web import session_store

SESSION_COOKIE = "kiln_session"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class CsrfRejected(KilnError):
    """A cookie-authenticated, state-changing request without the session's CSRF token."""

    status_code = 403
    error_type = "invalid_request_error"
    code = "csrf_token_invalid"


def session_secret(settings: Settings) -> str:
    """The configured secret, else one generated once and kept (mode 0600) in the data directory."""
    if settings.session_secret:
        return settings.session_secret
    path = Path(settings.data_dir) / "session_secret"
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    try:  # O_EXCL: when several processes start at once, the first one's secret wins
        with path.open("x") as handle:
            handle.write(secret)
        path.chmod(0o600)
    except FileExistsError:
        return path.read_text().strip()
    return secret


class BrowserSessions(SessionMiddleware):
    """Starlette's signed-cookie sessions, skipped for requests that carry an API key (apps, not
    browsers): the flood of API calls never pays for cookie parsing and signing."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and any(name == b"authorization" for name, _ in scope["headers"]):
            scope["session"] = {}
            await self.app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def install_sessions(app: FastAPI, settings: Settings) -> None:
    app.add_middleware(
        BrowserSessions,
        secret_key=session_secret(settings),
        session_cookie=SESSION_COOKIE,
        max_age=settings.session_max_age_s,
        same_site="lax",
        https_only=settings.session_https_only,
    )


def csrf_token(request: Request) -> str:
    """The session's CSRF token, made on first use (so the sign-in form has one too)."""
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(32)
    return token


def check_csrf(request: Request, submitted: str | None) -> None:
    expected = request.session.get("csrf") if "session" in request.scope else None
    if not expected or not submitted or not secrets.compare_digest(expected, submitted):
        raise CsrfRejected("Missing or wrong CSRF token; reload the page and try again.")


def sign_in(request: Request, account: Account) -> None:
    """A new session row for `account` (a database write: call it off the event loop)."""
    state = request.app.state.kiln
    token = session_store.open_session(state.db, account.user_id, state.settings.session_max_age_s)
    request.session.clear()  # a fresh session and CSRF token: no fixation across the sign-in
    request.session["sid"] = token
    csrf_token(request)


def sign_out(request: Request) -> None:
    """Deletes the session row (a database write: call it off the event loop)."""
    token = request.session.get("sid")
    if token:
        session_store.close_session(request.app.state.kiln.db, token)
    request.session.clear()


_ACCOUNT = "kiln_web_account"
"""Where a request's looked-up account is kept in its scope: one database read per request."""


def _session_token(request: Request) -> str | None:
    if "session" not in request.scope:
        return None
    return request.session.get("sid") or None


def session_user(request: Request) -> Account | None:
    """The signed-in user, without a CSRF check: for safe methods, or after `check_csrf`.

    Reads the database on a request's first call: call it from sync code (a `def` handler or
    dependency, which FastAPI runs in its thread pool); on the event loop, `await session_user_async`."""
    token = _session_token(request)
    if token is None:
        return None
    if _ACCOUNT not in request.scope:
        request.scope[_ACCOUNT] = session_store.session_owner(request.app.state.kiln.db, token)
    return request.scope[_ACCOUNT]


async def session_user_async(request: Request) -> Account | None:
    """`session_user` for coroutines: the database read runs in the thread pool."""
    token = _session_token(request)
    if token is None:
        return None
    if _ACCOUNT not in request.scope:
        owner = await run_in_threadpool(session_store.session_owner, request.app.state.kiln.db, token)
        request.scope[_ACCOUNT] = owner
    return request.scope[_ACCOUNT]


def _check_unsafe(request: Request) -> None:
    if request.method not in SAFE_METHODS:
        check_csrf(request, request.headers.get(CSRF_HEADER))


def session_account(request: Request) -> Account | None:
    """The signed-in browser user, or None, for a request that carries no API key; for unsafe
    methods it raises CsrfRejected (403) unless the `X-CSRF-Token` header matches the session's
    token. Sync (reads the database): from an `async def`, await `session_account_async`."""
    if _session_token(request) is None:
        return None
    _check_unsafe(request)
    return session_user(request)


async def session_account_async(request: Request) -> Account | None:
    """`session_account` for coroutines (the API's auth dependency): same answers, same CSRF rule,
    the database read in the thread pool."""
    if _session_token(request) is None:
        return None
    _check_unsafe(request)
    return await session_user_async(request)
