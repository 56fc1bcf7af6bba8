"""The dashboard at /admin: admins only, live stats, plans changed live, users and keys."""

from __future__ import annotations

import re
from typing import Any

from playwright.sync_api import expect
from test_chat import send


def test_admin_is_a_404_to_everyone_else(open_page: Any, people: Any) -> None:
    page = open_page(people("ann"))
    assert page.goto("/admin").status == 404
    assert page.request.get("/admin/api/stats").status == 404
    token = page.locator("meta[name=csrf-token]").get_attribute("content")
    refused = page.request.post("/admin/plans/free", form={"csrf_token": token, "images_per_day": "999"})
    assert refused.status == 404
    anonymous = open_page()
    assert anonymous.goto("/admin").status == 404


def test_raising_the_free_plan_changes_the_chat_users_meter_within_seconds(
    open_page: Any, people: Any
) -> None:
    chat = open_page(people("cal"))
    message = send(chat, "a small blue square")
    expect(message.locator("img.image")).to_be_visible()
    expect(chat.locator("#usage .meter-text")).to_have_text(re.compile(r"^2 of 3 images left today"))

    admin = open_page(people("root", plan="enterprise", admin=True))
    admin.goto("/admin")
    admin.fill("input[aria-label='free images per day']", "10")
    admin.click("#plan-free button[type=submit]")
    expect(admin.locator("#plan-free .saved")).to_have_text("Saved")
    # the chat polls its usage; the plan cache re-reads plans every live_settings_poll_s
    expect(chat.locator("#usage .meter-text")).to_have_text(
        re.compile(r"^9 of 10 images left today"), timeout=15_000
    )
    admin.reload()
    expect(admin.locator("input[aria-label='free images per day']")).to_have_value("10")

    admin.fill("input[aria-label='free images per day']", "-3")
    admin.click("#plan-free button[type=submit]")
    expect(admin.locator("#plan-free .saved")).to_contain_text("greater than or equal to 0")


def test_users_are_created_and_moved_between_plans(open_page: Any, people: Any, web: Any) -> None:
    from kiln.service.accounts import get_user

    admin = open_page(people("root", plan="enterprise", admin=True))
    admin.goto("/admin")
    admin.fill("#users input[name=name]", "newbie")
    admin.select_option("#users select[name=plan]", "free")
    admin.fill("#users input[name=password]", "a fine password")
    admin.click("text=Create user")
    expect(admin.locator(".flash")).to_have_text("Created user newbie on plan free.")
    admin.select_option("select[aria-label='Plan of newbie']", "plus")
    admin.locator("tr", has_text="newbie").locator("text=Change").click()
    expect(admin.locator(".flash")).to_have_text("newbie is now on plan plus.")
    assert get_user(web.state.db, "newbie").plan_name == "plus"

    admin.select_option("#keys select[name=user]", "newbie")
    admin.click("#keys >> text=Create key")
    expect(admin.locator(".new-key code")).to_contain_text("kiln-")
    admin.goto("/admin")
    admin.locator("#keys tr", has_text="newbie").locator("text=Revoke").click()
    expect(admin.locator(".flash")).to_contain_text("Revoked newbie's key")


def test_the_stats_feed_the_charts_and_degrade_to_no_data(open_page: Any, people: Any) -> None:
    chat = open_page(people("sue"))
    expect(send(chat, "a green triangle").locator("img.image")).to_be_visible()
    admin = open_page(people("root", plan="enterprise", admin=True))
    admin.goto("/admin")
    admin.wait_for_function("() => Number(document.body.dataset.statsPolls || 0) >= 2")
    stats = admin.request.get("/admin/api/stats").json()
    assert stats["images_total"] >= 1
    assert set(stats["plans"]) >= {"free", "plus", "enterprise"}
    assert stats["queue_depth"] is not None
    expect(admin.locator(".chart[data-chart=queue_depth]")).to_have_attribute("data-empty", "false")
    expect(admin.locator(".chart[data-chart=images_rate]")).to_have_attribute("data-empty", "false")
    if not stats["gpus"]:  # a CPU machine: no GPU gauges, so the chart says so
        expect(admin.locator(".chart[data-chart=gpu] svg")).to_have_text("no data")
    assert admin.js_errors == [] and chat.js_errors == []
