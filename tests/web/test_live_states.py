"""What the chat shows from the jobs' events and refusals, including states the fake pipeline and the
inline runner never produce (a preview, a long queue, an overloaded server, relax mode): those
responses are played to the page as the /v1 contract describes them.
"""

from __future__ import annotations

import base64
import io
import json
import re
from typing import Any

from PIL import Image
from playwright.sync_api import expect
from test_chat import WATCH_STATES, send


def sse(*events: tuple[str, dict]) -> str:
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events)


def tiny_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 80, 40)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_events_show_the_place_in_line_then_progress_with_a_preview(open_page: Any, people: Any) -> None:
    page = open_page(people("ann", plan="plus"))
    stream = sse(
        ("queued", {"queue_position": 3, "eta_s": 95}),
        ("position", {"queue_position": 0, "eta_s": 2}),
        ("progress", {"step": 6, "total": 12, "preview": tiny_png()}),
    )
    # the stream ends without an outcome, so the page catches up from GET /v1/jobs/{id} (the real one)
    page.route(
        re.compile(r".*/v1/jobs/[^/]+/events$"),
        lambda route: route.fulfill(status=200, body=stream, headers={"Content-Type": "text/event-stream"}),
    )
    page.evaluate(WATCH_STATES)
    message = send(page, "a purple circle")
    expect(message.locator("img.image")).to_be_visible()
    seen = page.evaluate("window.seenStates")
    assert "3 ahead in line · about 2 min" in seen, seen
    assert "Next in line · about 2 s" in seen, seen
    assert "Drawing · step 6 of 12" in seen, seen
    assert message.locator("img.preview").get_attribute("src").startswith("data:image/png;base64,")
    assert page.js_errors == []  # the preview's data: URL is allowed by the page's CSP


def test_an_overloaded_server_says_when_to_come_back(open_page: Any, people: Any) -> None:
    page = open_page(people("bo"))
    error = {
        "error": {"message": "busy", "type": "server_error", "param": None, "code": "server_is_overloaded"}
    }
    page.route(
        "**/v1/jobs",
        lambda route: route.fulfill(
            status=503,
            body=json.dumps(error),
            headers={"Content-Type": "application/json", "Retry-After": "40"},
        ),
    )
    page.fill("#prompt", "a busy picture")
    page.press("#prompt", "Enter")
    expect(page.locator("#notice")).to_have_text(
        re.compile(r"^Kiln is very busy right now\. Come back in 40 s")
    )
    expect(page.locator("#thread .msg")).to_have_count(0)


def test_relax_mode_users_see_they_are_in_the_slow_lane(open_page: Any, people: Any, web: Any) -> None:
    from kiln.service.plans import update_plan

    update_plan(web.state.db, "free", images_per_day=1, relax_mode=True)
    page = open_page(people("cy"))
    expect(send(page, "my one picture").locator("img.image")).to_be_visible()
    expect(page.locator("#usage .meter-text")).to_have_text(
        re.compile(r"^No images left today: you are in the slow lane · resets in")
    )
    # past the quota, a relax plan's job is admitted into the idle-only queue
    job = {"id": "job_relaxed", "status": "queued", "relax": True, "queue_position": 5, "eta_s": 600}
    page.route(
        "**/v1/jobs",
        lambda route: route.fulfill(
            status=202, body=json.dumps(job), headers={"Content-Type": "application/json"}
        ),
    )
    page.route(
        re.compile(r".*/v1/jobs/job_relaxed(/events)?$"),
        lambda route: route.fulfill(
            status=200,
            body=sse(("queued", {"queue_position": 5, "eta_s": 600})),
            headers={"Content-Type": "text/event-stream"},
        ),
    )
    page.click("a.new-chat")
    page.wait_for_selector(".hello")
    message = send(page, "one more, whenever")
    expect(page.locator("#notice")).to_contain_text("slow lane")
    expect(message.locator(".state")).to_have_text("5 ahead in line · about 10 min")
