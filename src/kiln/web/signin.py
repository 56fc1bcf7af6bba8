"""Sign-in and sign-out pages: a name, a password, and a fresh session on success.

Plain `def` handlers (FastAPI runs them in its thread pool): the throttle's storage, argon2 and the
session rows are all blocking calls that must stay off the event loop.
"""

from __future__ import annotations

import math
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from kiln.service.accounts import verify_password
from kiln.web.render import page
from kiln.web.session import check_csrf, session_account, sign_in, sign_out
from kiln.web.throttle import SignInThrottle

router = APIRouter(include_in_schema=False)


@router.get("/login")
def login_form(request: Request) -> Response:
    if session_account(request) is not None:
        return RedirectResponse("/", status_code=303)
    return page(request, "login.html")


@router.post("/login")
def login(
    request: Request,
    username: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    check_csrf(request, csrf_token)
    throttle: SignInThrottle = request.app.state.kiln_sign_in_throttle
    keys = (f"name:{username.strip().lower()}", f"addr:{request.client.host if request.client else '?'}")
    wait_s = throttle.retry_after_s(*keys)
    if wait_s > 0:
        return page(
            request,
            "login.html",
            status_code=429,
            username=username,
            error=f"Too many wrong passwords. Try again in {math.ceil(wait_s / 60)} min.",
            headers={"Retry-After": str(math.ceil(wait_s))},
        )
    db = request.app.state.kiln.db
    account = verify_password(db, username.strip(), password)  # argon2: slow on purpose
    if account is None:
        throttle.failed(*keys)
        return page(
            request, "login.html", status_code=401, error="Wrong name or password.", username=username
        )
    throttle.succeeded(keys[0])
    sign_in(request, account)
    return RedirectResponse("/", status_code=303)


@router.post("/logout")
def logout(request: Request, csrf_token: Annotated[str, Form()] = "") -> Response:
    check_csrf(request, csrf_token)
    sign_out(request)
    return RedirectResponse("/login", status_code=303)
