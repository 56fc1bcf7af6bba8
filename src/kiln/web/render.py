"""Page rendering: the Jinja2 environment, fingerprinted static URLs and the HTML 404 page."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from kiln import __version__
from kiln.service.accounts import Account
from kiln.web.session import csrf_token, session_user

WEB_DIR = Path(__file__).parent
STATIC_DIR = WEB_DIR / "static"
templates = Jinja2Templates(directory=str(WEB_DIR / "templates"))


def _fingerprints() -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:10] for p in STATIC_DIR.iterdir() if p.is_file()
    }


_FINGERPRINTS = _fingerprints()


def static_url(name: str) -> str:
    """`/static/NAME?v=HASH`, so browsers cache assets until they change."""
    return f"/static/{name}?v={_FINGERPRINTS.get(name, __version__)}"


templates.env.globals.update(static_url=static_url, version=__version__)


# Only Kiln's own script, stylesheet and images: nothing from elsewhere can load, even by mistake.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def page(
    request: Request,
    template: str,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
    **context: Any,
) -> HTMLResponse:
    context.setdefault("account", None)
    return templates.TemplateResponse(
        request,
        template,
        {"csrf_token": csrf_token(request), **context},
        status_code=status_code,
        headers={**SECURITY_HEADERS, **(headers or {})},
    )


def not_found_page(request: Request, account: Account | None = None) -> HTMLResponse:
    return page(request, "not_found.html", status_code=404, account=account)


def browser_account(request: Request) -> Account | None:
    """The signed-in user of a page view (a GET; form posts call `check_csrf` first)."""
    return session_user(request)


def to_login(request: Request) -> RedirectResponse:
    return RedirectResponse("/login", status_code=303)
