"""Dependencies declared once, typed: the app state and the calling account (Bearer API key)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from kiln.api.state import AppState
from kiln.errors import AuthenticationFailed
from kiln.service.accounts import Account

_bearer = HTTPBearer(auto_error=False, description="A Kiln API key, `kiln-…`.")


async def app_state(request: Request) -> AppState:
    return request.app.state.kiln  # async: a sync dependency would cost a thread hop per request


async def current_account(
    request: Request,
    state: Annotated[AppState, Depends(app_state)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Account:
    """The key's owner, from the key cache (a revocation anywhere is refused within a second).
    Without a key, the web UI's signed-in user (CSRF-checked for state-changing calls)."""
    if credentials is None or not credentials.credentials:
        if state.browser_account is not None:
            browser = await state.browser_account(request)
            if browser is not None:
                return browser
        raise AuthenticationFailed(
            "You didn't provide an API key. Send it as 'Authorization: Bearer kiln-…'."
        )
    return await state.keys.authenticate(credentials.credentials.strip())


State = Annotated[AppState, Depends(app_state)]
CurrentAccount = Annotated[Account, Depends(current_account)]
