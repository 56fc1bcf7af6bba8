"""The keys page shows the user's webhook signing secret, the same one the API signs with, and
rotates it (the page and the API then agree on the new one)."""

from __future__ import annotations

from typing import Any

import httpx

from kiln.service import accounts


def test_the_keys_page_shows_and_rotates_the_webhook_secret(open_page: Any, people: Any, web: Any) -> None:
    ann = people("ann")
    key, _ = accounts.create_key(web.state.db, ann.name)
    page = open_page(ann)
    page.goto("/keys")
    shown = page.locator("#webhook-secret").inner_text().strip()
    with httpx.Client(base_url=web.base_url, headers={"Authorization": f"Bearer {key}"}) as api:
        assert shown.startswith("whsec_") and api.get("/v1/webhooks/secret").json()["secret"] == shown
        page.click("#webhooks >> text=Rotate secret")
        page.wait_for_selector("text=Webhook secret rotated")
        rotated = page.locator("#webhook-secret").inner_text().strip()
        assert rotated != shown and api.get("/v1/webhooks/secret").json()["secret"] == rotated
    assert page.js_errors == []
