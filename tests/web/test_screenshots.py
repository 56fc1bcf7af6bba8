"""Screenshots for the README: the chat on a desktop and on a phone, and the dashboard.

Written to docs/ (chat-desktop.png, chat-phone.png, admin.png) by a normal test run, so they always
show the UI as it is.
"""

from __future__ import annotations

import re
from typing import Any

from conftest import DOCS
from playwright.sync_api import expect
from test_chat import send


def test_screenshots_of_the_chat_and_the_dashboard(open_page: Any, people: Any) -> None:
    DOCS.mkdir(exist_ok=True)
    people("olga", plan="enterprise", admin=True)
    sam = people("sam", plan="plus")
    page = open_page(sam)
    for earlier in ("a red bicycle leaning on a wall", "three pears on a blue plate"):
        message = send(page, earlier)
        expect(message.locator("img.image")).to_be_visible()
        page.click("a.new-chat")
        page.wait_for_selector(".hello")
    first = send(page, "a lighthouse on a cliff at dusk, oil painting")
    expect(first.locator("img.image")).to_be_visible()
    second = send(page, "now make the sky stormy")
    expect(second.locator("img.image")).to_be_visible()
    expect(page.locator("#usage .meter-text")).to_have_text(re.compile(r"left today"))
    page.screenshot(path=DOCS / "chat-desktop.png")

    phone = open_page(sam, width=375, height=740)
    phone.goto(page.url)
    expect(phone.locator("#thread .msg img.image").last).to_be_visible()
    expect(phone.locator("#usage .meter-text")).to_have_text(re.compile(r"left today"))
    phone.screenshot(path=DOCS / "chat-phone.png")

    admin = open_page(people("root", plan="enterprise", admin=True))
    admin.goto("/admin")
    admin.wait_for_function("Number(document.body.dataset.statsPolls || 0) >= 3")
    admin.screenshot(path=DOCS / "admin.png", full_page=True)
