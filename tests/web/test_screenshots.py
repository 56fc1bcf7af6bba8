"""Screenshots for the README: the chat on a desktop and on a phone, and the dashboard under load.

`make screenshots` (KILN_UPDATE_SCREENSHOTS=1) writes them to docs/ (chat-desktop.png, chat-phone.png,
admin.png); an ordinary run takes them into a temporary folder, so tests leave the work tree alone.
The pictures come from `scene_fake`, which draws what the prompt names.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect
from test_chat import send
from web_helpers import DOCS

from kiln.config import ModelSpec, Settings
from kiln.service import accounts


@pytest.fixture
def settings(settings: Settings) -> Settings:
    model = settings.models["fake"]
    scene = ModelSpec(
        path=model.path,
        loader="scene_fake:load_scene_fake",
        native_size=256,
        steps=12,
        options={"step_s": 0.05},
    )
    # the stand-in draws what the embedded model draws, so its follow-ups are composed by the same rules
    return settings.model_copy(update={"models": {"fake": scene}, "prompt_composer_rules_models": ["fake"]})


def submit_bursts(base_url: str, keys: list[str], stop: threading.Event) -> None:
    """Bursts of jobs from several plans, so the queue fills and drains while the dashboard watches."""
    prompts = ["a small red square", "a large blue circle", "a green triangle on the left"]
    with httpx.Client(base_url=base_url, timeout=30) as client:
        while not stop.is_set():
            for i, key in enumerate(keys * 2):
                client.post(
                    "/v1/jobs",
                    json={"prompt": prompts[i % 3], "size": "256x256"},
                    headers={"Authorization": f"Bearer {key}"},
                )
            stop.wait(6)


def test_screenshots_of_the_chat_and_the_dashboard(
    open_page: Any, people: Any, web: Any, tmp_path: Path
) -> None:
    out = DOCS if os.environ.get("KILN_UPDATE_SCREENSHOTS") else tmp_path
    out.mkdir(exist_ok=True)
    sam = people("sam", plan="plus")
    root = people("root", plan="enterprise", admin=True)
    keys = []  # made before the server is busy (see `people`)
    for name, plan in (("ada", "enterprise"), ("bob", "plus"), ("cy", "free")):
        accounts.create_user(web.state.db, name, plan)
        keys.append(accounts.create_key(web.state.db, name)[0])
    page = open_page(sam)
    for earlier in ("a yellow triangle on a teal background", "a small white square on a black background"):
        expect(send(page, earlier).locator("img.image")).to_be_visible()
        page.click("a.new-chat")
        page.wait_for_selector(".hello")
    first = send(page, "a large orange circle on a purple background")
    expect(first.locator("img.image")).to_be_visible()
    second = send(page, "now make it a green square on the left")
    expect(second.locator("img.image")).to_be_visible()
    expect(page.locator("#usage .meter-text")).to_have_text(re.compile(r"left today"))
    page.wait_for_function("() => [...document.images].every((i) => i.complete)")
    page.screenshot(path=out / "chat-desktop.png")

    phone = open_page(sam, width=375, height=740)
    phone.goto(page.url)
    expect(phone.locator("#thread .msg img.image").last).to_be_visible()
    expect(phone.locator("#usage .meter-text")).to_have_text(re.compile(r"left today"))
    phone.wait_for_function("() => [...document.images].every((i) => i.complete)")
    phone.screenshot(path=out / "chat-phone.png")

    admin = open_page(root)
    admin.goto("/admin?every=0.5")
    stop = threading.Event()
    load = threading.Thread(target=submit_bursts, args=(web.base_url, keys, stop), daemon=True)
    load.start()
    try:
        # twenty seconds of history for the picture; a few polls are enough to check the page
        polls = 40 if out == DOCS else 6
        admin.wait_for_function(
            "(n) => Number(document.body.dataset.statsPolls || 0) >= n", arg=polls, timeout=60_000
        )
    finally:
        stop.set()
        load.join(30)
    admin.screenshot(path=out / "admin.png", full_page=True)
