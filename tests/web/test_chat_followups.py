"""Follow-ups in the chat keep what was said: each reply's picture is drawn from a prompt composed
from the whole thread (the first one completed with what the user left unsaid), shown under the
picture, in headless Chromium.

`KILN_UPDATE_SCREENSHOTS=1` writes docs/chat-followup-1.png … -3.png (one per step) with the real
embedded model (its composer chosen by its path, as `kiln serve` does); an ordinary run uses the
stand-in `scene_fake` (named in `prompt_composer_rules_models`, a few seconds instead of a minute of
torch on two cores) and takes the pictures into a temporary folder. The embedded model may not draw
words yet: the test asserts the composed prompts, not what the pictures read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect
from test_chat import send
from web_helpers import DOCS

from kiln.config import EMBEDDED_MODEL_NAME, EMBEDDED_MODEL_PATH, ModelSpec, Settings

UPDATE = bool(os.environ.get("KILN_UPDATE_SCREENSHOTS"))
HELLO = 'a large blue circle in the centre with the word "HELLO" on it, on a black background'
STEPS = (
    # the first sentence leaves size, place and background unsaid: the composer fills them in
    ('a blue circle with the word "HELLO" on it', HELLO),
    ('now make it say "BYE"', HELLO.replace("HELLO", "BYE")),
    ("move it to the left", HELLO.replace("HELLO", "BYE").replace("in the centre", "on the left")),
)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    if not UPDATE:
        scene = ModelSpec(path=settings.models["fake"].path, loader="scene_fake:load_scene_fake",
                          native_size=256, steps=4, options={"step_s": 0.02})
        return settings.model_copy(update={"models": {"fake": scene},
                                           "prompt_composer_rules_models": ["fake"]})
    if not (EMBEDDED_MODEL_PATH / "model_index.json").is_file():
        pytest.fail("the embedded model is not in src/kiln/embedded/model")
    return settings.model_copy(update={
        "models": {EMBEDDED_MODEL_NAME: ModelSpec(path=EMBEDDED_MODEL_PATH)},
        "default_model": EMBEDDED_MODEL_NAME, "model_aliases": {},
    })


def test_follow_ups_keep_what_was_said_and_show_the_composed_prompt(
    open_page: Any, people: Any, tmp_path: Path
) -> None:
    out = DOCS if UPDATE else tmp_path
    out.mkdir(exist_ok=True)
    page = open_page(people("uma", plan="plus"), width=900, height=1000)
    for step, (text, composed) in enumerate(STEPS, start=1):
        message = send(page, text)
        # the real model loads torch first
        expect(message.locator("img.image")).to_be_visible(timeout=120_000)
        expect(message.locator(".kind-tag")).to_be_visible(visible=step > 1)
        expect(message.locator(".composed")).to_be_visible()
        expect(message.locator(".composed-text")).to_have_text(composed)
        job = page.request.get(f"/v1/jobs/{message.get_attribute('data-job-id')}").json()
        assert (job["prompt"], job["instruction"]) == (composed, text)
        page.wait_for_function("() => [...document.images].every((i) => i.complete)")
        page.screenshot(path=out / f"chat-followup-{step}.png")

    page.reload()  # the composed prompts come back with the thread
    expect(page.locator("#thread .msg .composed-text")).to_have_text([composed for _, composed in STEPS])
    expect(page.locator("#thread .msg .composed")).to_have_count(3)
    assert page.js_errors == []
