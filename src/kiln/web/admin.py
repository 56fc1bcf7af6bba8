"""The operator's dashboard at `/admin`: live charts, plans edited live, users and keys.

Admins only; everyone else gets the same 404 as for a page that does not exist. Every handler is a
plain `def` (FastAPI runs it in its thread pool): each reads or writes the database, and creating a
user hashes a password with argon2 — none of it may run on the event loop.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from kiln.errors import InvalidRequest, KilnError, NotFound
from kiln.service import accounts, audit, plans
from kiln.service.accounts import Account
from kiln.web import stats
from kiln.web.render import not_found_page, page
from kiln.web.session import check_csrf, session_user

router = APIRouter(prefix="/admin", include_in_schema=False)


class NotAdmin(Exception):
    """Raised by the dependency; answered with the plain 404 page."""


def admin(request: Request) -> Account:
    account = session_user(request)
    if account is None or not account.is_admin:
        raise NotAdmin()
    return account


def admin_form(request: Request, csrf_token: Annotated[str, Form()] = "") -> Account:
    """An admin's form post with the session's CSRF token (non-admins get the 404 first)."""
    account = admin(request)
    check_csrf(request, csrf_token)
    return account


Admin = Annotated[Account, Depends(admin)]
AdminForm = Annotated[Account, Depends(admin_form)]


def install_admin_errors(app) -> None:  # type: ignore[no-untyped-def]
    @app.exception_handler(NotAdmin)
    def _not_admin(request: Request, _: NotAdmin) -> Response:  # sync: Starlette runs it in a thread
        return not_found_page(request, session_user(request))


@router.get("")
def dashboard(request: Request, account: Admin) -> Response:
    return _dashboard(request, account)


def _dashboard(request: Request, account: Account, status_code: int = 200, **extra: object) -> Response:
    db = request.app.state.kiln.db
    flash = request.session.pop("flash", None)
    return page(
        request,
        "admin.html",
        status_code=status_code,
        account=account,
        plans=plans.list_plans(db),
        users=accounts.list_users(db),
        keys=accounts.list_keys(db)[::-1],
        audit=_audit(db, AUDIT_SHOWN),
        flash=flash,
        **extra,
    )


AUDIT_SHOWN = 20
"""Audit entries on the dashboard (all of them: `kiln audit list`, or /admin/api/audit?limit=)."""


def _audit(db, limit: int) -> list[dict]:  # type: ignore[no-untyped-def]
    return [{**e.as_dict(), "change": audit.describe(e)} for e in audit.list_events(db, limit=limit)]


@router.get("/api/stats")
def stats_json(request: Request, _: Admin) -> dict:
    db = request.app.state.kiln.db
    snapshot = stats.snapshot(request.app)
    snapshot["plans"] = [p.name for p in plans.list_plans(db)]
    snapshot["audit"] = _audit(db, AUDIT_SHOWN)
    return snapshot


@router.get("/api/audit")
def audit_json(request: Request, _: Admin, limit: int = 100, action: str | None = None) -> dict:
    """The audit list, newest first: what operators and the thermal guard changed."""
    entries = audit.list_events(request.app.state.kiln.db, limit=max(1, min(limit, 1000)), action=action)
    return {"data": [{**e.as_dict(), "change": audit.describe(e)} for e in entries]}


def _optional_int(value: str, field: str) -> int | None:
    value = value.strip()
    if value in ("", "unlimited", "∞"):
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidRequest(f"{field} must be a whole number, or empty for unlimited", param=field) from None


@router.post("/plans/{name}")
def update_plan(
    request: Request,
    account: AdminForm,
    name: str,
    images_per_day: Annotated[str, Form()] = "",
    priority_weight: Annotated[int, Form()] = 1,
    max_concurrent: Annotated[int, Form()] = 1,
    max_n: Annotated[int, Form()] = 1,
    wait_target_s: Annotated[float, Form()] = 120.0,
    relax_mode: Annotated[bool, Form()] = False,
) -> Response:
    wants_json = "application/json" in request.headers.get("accept", "")
    try:
        limits = plans.update_plan(
            request.app.state.kiln.db,
            name,
            actor=f"admin:{account.name}",
            images_per_day=_optional_int(images_per_day, "images_per_day"),
            priority_weight=priority_weight,
            max_concurrent=max_concurrent,
            max_n=max_n,
            wait_target_s=wait_target_s,
            relax_mode=relax_mode,
        )
    except (KilnError, ValueError) as exc:
        message = getattr(exc, "message", None) or _first_error(exc)
        if wants_json:
            return JSONResponse({"error": {"message": message}}, status_code=400)
        return _flash(request, f"Plan {name}: {message}")
    request.app.state.kiln.plans.changed()  # read again here at once, and on every replica
    if wants_json:
        return JSONResponse({"plan": limits.__dict__, "message": f"Saved {name}."})
    return _flash(request, f"Saved plan {name}.")


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return str(exc)


def _flash(request: Request, message: str, anchor: str = "") -> Response:
    request.session["flash"] = message
    return RedirectResponse(f"/admin{anchor}", status_code=303)


@router.post("/users")
def create_user(
    request: Request,
    _: AdminForm,
    name: Annotated[str, Form()],
    plan: Annotated[str, Form()],
    password: Annotated[str, Form()] = "",
    is_admin: Annotated[bool, Form()] = False,
) -> Response:
    try:
        accounts.create_user(
            request.app.state.kiln.db, name.strip(), plan, is_admin=is_admin, password=password or None
        )
    except KilnError as exc:
        return _flash(request, exc.message, "#users")
    return _flash(request, f"Created user {name.strip()} on plan {plan}.", "#users")


@router.post("/users/{name}/plan")
def set_user_plan(request: Request, _: AdminForm, name: str, plan: Annotated[str, Form()]) -> Response:
    try:
        accounts.set_plan(request.app.state.kiln.db, name, plan)
    except KilnError as exc:
        return _flash(request, exc.message, "#users")
    return _flash(request, f"{name} is now on plan {plan}.", "#users")


@router.post("/keys")
def create_key(
    request: Request, account: AdminForm, user: Annotated[str, Form()], label: Annotated[str, Form()] = ""
) -> Response:
    try:
        key, _ = accounts.create_key(request.app.state.kiln.db, user, label.strip() or None)
    except NotFound as exc:
        return _flash(request, exc.message, "#keys")
    return _dashboard(request, account, new_key=key, new_key_user=user)  # shown once, never stored


@router.post("/keys/{prefix}/revoke")
def revoke_key(request: Request, _: AdminForm, prefix: str) -> Response:
    try:
        info = accounts.revoke_key(request.app.state.kiln.db, prefix)
    except KilnError as exc:
        return _flash(request, exc.message, "#keys")
    request.app.state.kiln.keys.forget_prefix(info.prefix)  # refused here at once, elsewhere within 1 s
    return _flash(request, f"Revoked {info.user_name}'s key {info.prefix}….", "#keys")
