"""Dependencies declared once, typed: the app state and the calling account (Bearer API key)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from kiln.api.state import AppState
from kiln.errors import AuthenticationFailed
from kiln.service.accounts import Account, authenticate_key
from kiln.web.session import session_account

_bearer = HTTPBearer(auto_error=False, description="A Kiln API key, `kiln-…`.")


def app_state(request: Request) -> AppState:
    return request.app.state.kiln


def current_account(
    request: Request,
    state: Annotated[AppState, Depends(app_state)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Account:
    """The key's owner; checked against the database on every request, so a revoked key fails at once.
    Without a key, the web UI's signed-in user (CSRF-checked for state-changing calls).
    (A sync dependency: FastAPI runs it in its thread pool.)"""
    if credentials is None or not credentials.credentials:
        if (browser := session_account(request)) is not None:
            return browser
        raise AuthenticationFailed(
            "You didn't provide an API key. Send it as 'Authorization: Bearer kiln-…'."
        )
    return authenticate_key(state.db, credentials.credentials.strip())


State = Annotated[AppState, Depends(app_state)]
CurrentAccount = Annotated[Account, Depends(current_account)]
