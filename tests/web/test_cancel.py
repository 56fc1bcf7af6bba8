"""Cancelling from the chat: DELETE /v1/jobs/{id} with the session and its CSRF header; no charge."""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.sync_api import expect
from test_chat import send

from kiln.config import Settings


@pytest.fixture
def settings(settings: Settings) -> Settings:
    slow = settings.models["fake"].model_copy(update={"options": {"step_s": 1.0}})  # 12 s: time to cancel
    return settings.model_copy(update={"models": {"fake": slow}})


def test_a_waiting_image_can_be_cancelled_and_is_not_charged(open_page: Any, people: Any) -> None:
    page = open_page(people("ivy"))
    message = send(page, "a slow picture")
    expect(message).to_have_attribute("data-job-id", re.compile(r"^job_"))
    message.locator("button.cancel").click()
    expect(message.locator(".error")).to_have_text("Cancelled; it was not charged.")
    expect(message.locator(".pending")).to_be_hidden()
    expect(page.locator("#usage .meter-text")).to_have_text(re.compile(r"^3 of 3 images left today"))
    page.reload()
    expect(page.locator("#thread .msg .error")).to_have_text("Cancelled.")
