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


WATCH_STATES = """() => {
  window.seenStates = [];
  new MutationObserver(() => {
    for (const state of document.querySelectorAll('#thread .msg .state')) {
      const image = state.closest('.msg').querySelector('img.image');
      if (image.hidden) window.seenStates.push(state.textContent);
    }
  }).observe(document.querySelector('#thread'), {subtree: true, childList: true, characterData: true});
}"""


def test_a_sentence_becomes_an_image_with_its_progress_first(open_page: Any, people: Any, web: Any) -> None:
    page = open_page(people("ann"))
    expect(page.locator("#usage .meter-text")).to_have_text(re.compile(r"3 of 3 images left today"))
    page.evaluate(WATCH_STATES)
    message = send(page, "a lighthouse on a cliff at dusk")
    expect(message.locator("img.image")).to_be_visible()
    assert page.evaluate("(img) => img.naturalWidth", message.locator("img.image").element_handle()) > 0
    expect(message.locator(".pending")).to_be_hidden()
    # while it waited, the message showed its live state: its place in line, then the drawing
    seen = page.evaluate("window.seenStates")
    assert any(re.search(r"line|Drawing", text) for text in seen), seen
    if any(getattr(r, "path", "") == "/v1/jobs/{job_id}/events" for r in web.app.routes):
        assert any(re.fullmatch(r"Drawing · step \d+ of 12", text) for text in seen), seen
    expect(message.locator("a.download")).to_have_attribute(
        "href", re.compile(r"^/v1/images/img_\w+/content$")
    )
    expect(page.locator("#usage .meter-text")).to_have_text(re.compile(r"2 of 3 images left today"))
    # the conversation is kept: it has a URL, is listed at the side and survives a reload
    expect(page).to_have_url(re.compile(r"/c/conv_\w+$"))
    expect(page.locator(".conversations a[aria-current=page]")).to_have_text(
        "a lighthouse on a cliff at dusk"
    )
    page.reload()
    expect(page.locator("#thread .msg img.image")).to_be_visible()
    assert page.js_errors == []


def test_a_follow_up_edits_the_last_image_and_again_uses_another_seed(
    open_page: Any, people: Any, web: Any
) -> None:
    page = open_page(people("bea", plan="plus"))
    first = send(page, "a red circle on a blue background")
    expect(first.locator("img.image")).to_be_visible()
    first_id = first.locator("img.image").get_attribute("data-image-id")

    edit = send(page, "make the circle green")
    expect(edit.locator(".kind-tag")).to_be_visible()
    expect(edit.locator("img.image")).to_be_visible()
    assert edit.get_attribute("data-source-image") == first_id

    again = page.locator("#thread .msg").nth(0).locator("button.again")
    again.click()
    third = page.locator("#thread .msg").nth(2)
    expect(third.locator(".text")).to_have_text("a red circle on a blue background")
    expect(third.locator("img.image")).to_be_visible()

    from kiln.db.models import Job

    with web.state.db() as session:
        jobs = {j.id: j for j in session.query(Job).all()}
    ids = [page.locator("#thread .msg").nth(i).get_attribute("data-job-id") for i in range(3)]
    generate, edited, repeated = (jobs[i] for i in ids)
    assert edited.kind == "edit" and edited.params.get("inputs", {}).get("image")
    assert repeated.kind == "generate" and repeated.prompt == generate.prompt
    assert repeated.seed != generate.seed

    page.reload()  # the thread, kinds included, comes back from the database
    expect(page.locator("#thread .msg")).to_have_count(3)
    expect(page.locator("#thread .msg").nth(1).locator(".kind-tag")).to_be_visible()


def test_the_fourth_free_image_is_refused_with_the_time_to_come_back(open_page: Any, people: Any) -> None:
    page = open_page(people("cal"))
    for i in range(3):
        if i:
            page.click("a.new-chat")
            page.wait_for_selector(".hello")
        expect(send(page, f"picture number {i + 1}").locator("img.image")).to_be_visible()
    expect(page.locator("#usage .meter-text")).to_have_text(re.compile(r"No images left today · resets in"))
    page.click("a.new-chat")
    page.wait_for_selector(".hello")
    page.fill("#prompt", "one picture too many")
    page.press("#prompt", "Enter")
    notice = page.locator("#notice")
    expect(notice).to_have_text(
        re.compile(r"You have used all 3 images for today\. Come back in \d+ (h|min|s)")
    )
    expect(page.locator("#thread .msg")).to_have_count(0)
    expect(page.locator("#prompt")).to_have_value("one picture too many")  # nothing typed is lost


def test_another_user_gets_404_for_a_conversation_or_image_by_url(open_page: Any, people: Any) -> None:
    ann = open_page(people("dan"))
    message = send(ann, "a private picture")
    expect(message.locator("img.image")).to_be_visible()
    conversation_url = ann.url
    image_url = message.locator("a.download").get_attribute("href")
    assert ann.request.get(image_url).status == 200

    eve = open_page(people("eve"))
    assert eve.goto(conversation_url).status == 404
    expect(eve.locator("h1")).to_have_text("Not found")
    assert eve.request.get(image_url).status == 404
    assert eve.request.get(image_url.removesuffix("/content")).status == 404
    expect(eve.locator(".conversations a")).to_have_count(0)


def test_a_post_without_the_csrf_token_is_refused(open_page: Any, people: Any, web: Any) -> None:
    page = open_page(people("fay"))
    conversation = page.request.post("/web/api/conversations", data={"title": "x"})
    assert conversation.status == 403
    assert conversation.json()["error"]["code"] == "csrf_token_invalid"
    job = page.request.post("/v1/jobs", data={"prompt": "no token"})
    assert job.status == 403
    keys = page.request.post("/keys", form={"label": "stolen"})
    assert keys.status == 403
    signout = page.request.post("/logout", form={})
    assert signout.status == 403
    # with the page's token, the same call goes through
    token = page.locator("meta[name=csrf-token]").get_attribute("content")
    ok = page.request.post("/web/api/conversations", data={"title": "x"}, headers={"X-CSRF-Token": token})
    assert ok.status == 201


def test_the_chat_fits_a_375_px_phone_without_horizontal_scroll(open_page: Any, people: Any) -> None:
    page = open_page(people("gus", admin=True), width=375, height=740)
    message = send(page, "a very long sentence " * 12 + "withaverylongwordthatdoesnotbreakanywhereatall" * 3)
    expect(message.locator("img.image")).to_be_visible()
    for path in (page.url, "/keys", "/admin"):
        page.goto(path)
        page.wait_for_load_state("load")
        assert page.evaluate("document.documentElement.scrollWidth") <= 375, path
    page.goto("/")
    expect(page.locator("#sidebar .new-chat")).not_to_be_in_viewport()
    page.click(".sidebar-toggle")
    expect(page.locator("#sidebar .new-chat")).to_be_in_viewport()
    page.click("#thread", position={"x": 340, "y": 300})
    expect(page.locator("#sidebar .new-chat")).not_to_be_in_viewport()
