"""The chat at `/`: pages for the thread and the user's API keys, and the two small JSON calls the
page makes to remember conversations. Images themselves go through the public /v1 jobs API.

Every handler is a plain `def` (FastAPI runs it in its thread pool): each one reads the database.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from kiln.errors import AuthenticationFailed, KilnError, NotFound
from kiln.service import accounts, plans, webhooks_secret
from kiln.service.accounts import Account
from kiln.web import conversations
from kiln.web.render import browser_account, not_found_page, page, to_login
from kiln.web.session import check_csrf, session_account, session_user

router = APIRouter(include_in_schema=False)


def signed_in(request: Request) -> Account:
    """Dependency for the page's JSON calls: the session's user (CSRF-checked when unsafe) or 401."""
    account = session_account(request)
    if account is None:
        raise AuthenticationFailed("Sign in first.")
    return account


SignedIn = Annotated[Account, Depends(signed_in)]


@router.get("/")
def chat_home(request: Request) -> Response:
    return _chat(request, None)


@router.get("/c/{conversation_id}")
def chat_conversation(request: Request, conversation_id: str) -> Response:
    return _chat(request, conversation_id)


def _chat(request: Request, conversation_id: str | None) -> Response:
    account = browser_account(request)
    if account is None:
        return to_login(request)
    db = request.app.state.kiln.db
    current, messages = None, []
    if conversation_id is not None:
        try:
            current = conversations.get_conversation(db, account.user_id, conversation_id)
        except NotFound:
            return not_found_page(request, account)
        messages = conversations.thread(db, account.user_id, conversation_id)
    return page(
        request,
        "chat.html",
        account=account,
        current=current,
        messages=messages,
        conversations=conversations.list_conversations(db, account.user_id),
        relax=plans.get_plan(db, account.plan_name).relax_mode,
    )


class NewConversation(BaseModel):
    title: str = Field("", max_length=conversations.MAX_TEXT_CHARS)


class NewMessage(BaseModel):
    text: str = Field(min_length=1, max_length=conversations.MAX_TEXT_CHARS)
    job_id: str = Field(max_length=40)
    kind: str = "generate"
    source_image_id: str | None = Field(None, max_length=40)


@router.post("/web/api/conversations", status_code=201)
def new_conversation(request: Request, account: SignedIn, body: NewConversation) -> dict:
    info = conversations.create_conversation(request.app.state.kiln.db, account.user_id, body.title)
    return {"id": info.id, "title": info.title, "url": f"/c/{info.id}"}


@router.post("/web/api/conversations/{conversation_id}/messages", status_code=201)
def new_message(request: Request, account: SignedIn, conversation_id: str, body: NewMessage) -> dict:
    view = conversations.add_message(
        request.app.state.kiln.db,
        account.user_id,
        conversation_id,
        text=body.text,
        job_id=body.job_id,
        kind=body.kind,
        source_image_id=body.source_image_id,
    )
    return {"id": view.id, "job_id": view.job_id, "status": view.status}


@router.get("/keys")
def keys_page(request: Request) -> Response:
    account = browser_account(request)
    if account is None:
        return to_login(request)
    return _keys(request, account)


def _keys(request: Request, account: Account, **extra: object) -> Response:
    db = request.app.state.kiln.db
    keys = accounts.list_keys(db, account.name)
    extra.setdefault("webhook_secret", webhooks_secret.get_secret(db, account.user_id))
    return page(request, "keys.html", account=account, keys=keys[::-1], **extra)


@router.post("/keys")
def create_key(
    request: Request,
    label: Annotated[str, Form(max_length=128)] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    check_csrf(request, csrf_token)
    account = session_user(request)
    if account is None:
        return to_login(request)
    key, _ = accounts.create_key(request.app.state.kiln.db, account.name, label.strip() or None)
    return _keys(request, account, new_key=key)  # rendered, never stored: shown exactly once


@router.post("/keys/webhook-secret/rotate")
def rotate_webhook_secret(request: Request, csrf_token: Annotated[str, Form()] = "") -> Response:
    check_csrf(request, csrf_token)
    account = session_user(request)
    if account is None:
        return to_login(request)
    secret = webhooks_secret.rotate_secret(request.app.state.kiln.db, account.user_id)
    return _keys(request, account, webhook_secret=secret,
                 notice="Webhook secret rotated: deliveries are signed with the new one from now on.")


@router.post("/keys/{prefix}/revoke")
def revoke_key(request: Request, prefix: str, csrf_token: Annotated[str, Form()] = "") -> Response:
    check_csrf(request, csrf_token)
    account = session_user(request)
    if account is None:
        return to_login(request)
    try:
        info = accounts.revoke_key(request.app.state.kiln.db, prefix, user_id=account.user_id)
    except KilnError as exc:
        return _keys(request, account, error=exc.message)
    request.app.state.kiln.keys.forget_prefix(info.prefix)  # refused here at once, elsewhere within 1 s
    return _keys(request, account, notice=f"Key {info.prefix}… revoked.")
