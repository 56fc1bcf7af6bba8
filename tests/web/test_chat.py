"""The chat at `/`: a sentence becomes an image, a reply edits it, the meter and the refusals."""

from __future__ import annotations

import re
from typing import Any

from playwright.sync_api import expect


def send(page: Any, text: str) -> Any:
    """Type a sentence and press Enter; returns the new message's locator."""
    count = page.locator("#thread .msg").count()
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    message = page.locator("#thread .msg").nth(count)
    expect(message.locator(".text")).to_have_text(text)
    return message


def test_a_sentence_becomes_an_image_with_its_progress_first(open_page: Any, people: Any) -> None:
    page = open_page(people("ann"))
    expect(page.locator("#usage .meter-text")).to_have_text(re.compile(r"3 of 3 images left today"))
    message = send(page, "a lighthouse on a cliff at dusk")
    # the live state is shown while it waits and draws; the picture replaces it
    expect(message.locator(".pending .state")).to_be_visible()
    expect(message.locator(".pending .state")).to_have_text(re.compile(r"line|Drawing|Starting|Sending"))
    expect(message.locator("img.image")).to_be_visible()
    assert page.evaluate("(img) => img.naturalWidth", message.locator("img.image").element_handle()) > 0
    expect(message.locator(".pending")).to_be_hidden()
    expect(message.locator("a.download")).to_have_attribute("href", re.compile(r"^/v1/images/img_\w+/content$"))
    expect(page.locator("#usage .meter-text")).to_have_text(re.compile(r"2 of 3 images left today"))
    # the conversation is kept: it has a URL, is listed at the side and survives a reload
    expect(page).to_have_url(re.compile(r"/c/conv_\w+$"))
    expect(page.locator(".conversations a[aria-current=page]")).to_have_text("a lighthouse on a cliff at dusk")
    page.reload()
    expect(page.locator("#thread .msg img.image")).to_be_visible()
    assert page.js_errors == []
