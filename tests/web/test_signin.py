"""Sign-in, the session cookie, sign-out, and API keys made and revoked from the page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import expect
from web_helpers import sign_in

from kiln.web.session import SESSION_COOKIE, session_secret


def test_sign_in_sets_an_httponly_samesite_cookie_and_sign_out_ends_it(open_page: Any, people: Any) -> None:
    ann = people("ann")
    page = open_page()
    assert page.goto("/").url.endswith("/login")
    page.fill("input[name=username]", "ann")
    page.fill("input[name=password]", "wrong password")
    page.click("button[type=submit]")
    expect(page.locator(".alert")).to_have_text("Wrong name or password.")

    sign_in(page, ann)
    cookie = next(c for c in page.context.cookies() if c["name"] == SESSION_COOKIE)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    assert page.evaluate("document.cookie") == ""  # scripts cannot read it

    assert page.request.get("/v1/usage").status == 200

    page.click("text=Sign out")
    page.wait_for_url("**/login")
    assert page.goto("/").url.endswith("/login")
    assert page.request.get("/v1/usage").status == 401
    # the session is gone on the server too: a copy of the old cookie no longer signs anyone in
    replay = open_page()
    replay.context.add_cookies([cookie])
    assert replay.request.get("/v1/usage").status == 401
    assert replay.goto("/").url.endswith("/login")


def test_a_new_password_ends_the_older_sessions(open_page: Any, people: Any, web: Any) -> None:
    from kiln.service.accounts import set_password

    page = open_page(people("max"))
    assert page.request.get("/v1/usage").status == 200
    set_password(web.state.db, "max", "a brand new password")
    assert page.request.get("/v1/usage").status == 401
    assert page.goto("/").url.endswith("/login")


def test_api_keys_are_shown_once_and_revoked_from_the_page(open_page: Any, people: Any, web: Any) -> None:
    page = open_page(people("kim"))
    page.click("text=API keys")
    page.fill("input[name=label]", "laptop")
    page.click("text=Create key")
    key = page.locator("#new-key").inner_text().strip()
    assert key.startswith("kiln-")
    with httpx.Client(base_url=web.base_url, headers={"Authorization": f"Bearer {key}"}) as client:
        assert client.get("/v1/usage").status_code == 200
        page.goto("/keys")
        expect(page.locator("#new-key")).to_have_count(0)  # never shown again
        assert key not in page.content()
        page.click("text=Revoke")
        expect(page.locator(".flash")).to_contain_text("revoked")
        expect(page.locator("tr.revoked")).to_have_count(1)
        assert client.get("/v1/usage").status_code == 401


def test_the_session_secret_is_generated_once_and_kept(tmp_path: Path, settings: Any) -> None:
    first = session_secret(settings.model_copy(update={"data_dir": tmp_path / "data"}))
    again = session_secret(settings.model_copy(update={"data_dir": tmp_path / "data"}))
    assert first == again and len(first) >= 40
    assert (tmp_path / "data" / "session_secret").stat().st_mode & 0o077 == 0
    assert session_secret(settings.model_copy(update={"session_secret": "configured"})) == "configured"


def test_guessing_passwords_is_slowed_down(open_page: Any, people: Any) -> None:
    zoe = people("zoe")
    page = open_page()
    page.goto("/login")
    for _ in range(5):
        page.fill("input[name=username]", "zoe")
        page.fill("input[name=password]", "not the password")
        page.click("button[type=submit]")
        expect(page.locator(".alert")).to_have_text("Wrong name or password.")
    page.fill("input[name=password]", zoe.password)  # even the right one waits now
    with page.expect_response("**/login") as response:
        page.click("button[type=submit]")
    assert response.value.status == 429 and int(response.value.headers["retry-after"]) > 0
    expect(page.locator(".alert")).to_have_text("Too many wrong passwords. Try again in 5 min.")

