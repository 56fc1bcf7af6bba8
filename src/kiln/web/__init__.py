"""The web UI: the chat at `/` and the operator's dashboard at `/admin`, server-rendered pages with
one small script and one stylesheet, every asset served by Kiln itself (no CDN, works offline).

`kiln.app.create_app` calls `install_web(app, state)` once. It installs the signed-in account as
`state.browser_account` (`session_account_async`), which the API's auth dependency awaits when a
request has no API key, so the browser uses the same /v1 endpoints as every other client (and the API
never imports the web UI). No handler here runs a database call or argon2 on the event loop
(tests/web/test_loop_lag.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi.staticfiles import StaticFiles

if TYPE_CHECKING:
    from fastapi import FastAPI

    from kiln.api.state import AppState
    from kiln.config import Settings


def throttle_storage(settings: Settings) -> tuple[str, str]:
    """The sign-in throttle's `limits` storage and namespace: `throttle_storage_url` when set, else
    the replicas' Redis (`redis_url`, under `redis_prefix`), else this process's memory."""
    from kiln.web.throttle import NAMESPACE

    if settings.redis_url and "throttle_storage_url" not in settings.model_fields_set:
        return settings.redis_url, f"{settings.redis_prefix}{NAMESPACE}"
    return settings.throttle_storage_url, NAMESPACE


def install_web(app: FastAPI, state: AppState) -> None:
    """Sessions, the pages, their two JSON calls and the static files."""
    from kiln.web import admin, chat, signin
    from kiln.web.render import STATIC_DIR
    from kiln.web.session import install_sessions, session_account_async
    from kiln.web.throttle import SignInThrottle

    install_sessions(app, state.settings)
    state.browser_account = session_account_async
    storage_url, namespace = throttle_storage(state.settings)
    app.state.kiln_sign_in_throttle = SignInThrottle(storage_url, namespace=namespace)
    admin.install_admin_errors(app)
    app.include_router(signin.router)
    app.include_router(chat.router)
    app.include_router(admin.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
