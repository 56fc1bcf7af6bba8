"""The webhook outbox on SQLite and PostgreSQL: each job transition writes its delivery in its own
transaction (and a transition that did not happen writes none), a job's deliveries are claimed in
order, and the deliverer refuses an address the guard does not allow at send time."""

from __future__ import annotations

import datetime as dt
import time

import pytest
from engine_server import free_port
from webhook_receiver import Receiver

from kiln.service import jobs, webhooks_outbox, webhooks_secret
from kiln.service.accounts import get_user
from kiln.service.plans import get_plan, update_plan
from kiln.service.storage_directory import DirectoryImageStore
from kiln.service.webhooks_delivery import WebhookDeliverer

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def admit(db, tmp_path, name: str, url: str, events: list[str] | None = None) -> jobs.JobView:  # type: ignore[no-untyped-def]
    account = get_user(db, name)
    params = {"output_format": "png", "webhook": webhooks_outbox.subscription_params(url, events)}
    spec = jobs.JobSpec(kind="generate", model="fake", prompt="a kiln", n=1, width=64, height=64, steps=4,
                        guidance_scale=1.0, seed=1, params=params)
    return jobs.create_job(db, DirectoryImageStore(tmp_path / "images"), account=account,
                           plan=get_plan(db, account.plan_name), spec=spec, now=NOW).job


def types(db, job_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [row["event_type"] for row in webhooks_outbox.deliveries_of(db, job_id)]


def wait_until(condition, timeout_s: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return result


def test_each_transition_writes_its_delivery_once_and_they_are_claimed_in_order(db, tmp_path, make_user) -> None:
    ann = make_user("ann", plan="plus")
    update_plan(db, "plus", max_concurrent=10)
    job = admit(db, tmp_path, ann.name, "http://127.0.0.1:9/hook")
    assert types(db, job.id) == []  # queued: nothing subscribed to
    assert jobs.mark_running_many(db, {job.id: 1}) == {job.id}
    assert jobs.mark_running_many(db, {job.id: 1}) == set()  # not queued any more: no second "started"
    assert jobs.report_progress(db, job.id, 2, 4) is False  # progress was not asked for
    assert jobs.fail_job(db, job.id, "boom", "it broke") is True
    jobs.cancel_job(db, job.id, None)  # already over: nothing happens, nothing is written
    rows = webhooks_outbox.deliveries_of(db, job.id)
    assert [r["event_type"] for r in rows] == ["job.started", "job.failed"]
    assert len({r["id"] for r in rows}) == 2 and all(r["id"].startswith("msg_") for r in rows)

    cancelled = admit(db, tmp_path, ann.name, "http://127.0.0.1:9/other", ["cancelled", "progress"])
    jobs.mark_running_many(db, {cancelled.id: 1})
    assert jobs.report_progress(db, cancelled.id, 1, 4) is True
    jobs.cancel_job(db, cancelled.id, ann.user_id)
    assert jobs.report_progress(db, cancelled.id, 2, 4) is False  # over: no progress after the end
    assert types(db, cancelled.id) == ["job.progress", "job.cancelled"]

    first, _ = webhooks_outbox.claim_due(db, 10, claim_s=60)
    assert [(d.job_id, d.event_type) for d in first] == [(job.id, "job.started"), (cancelled.id, "job.progress")]
    assert webhooks_outbox.claim_due(db, 10, claim_s=60) == ([], 0)  # claimed, and the later ones wait
    webhooks_outbox.settle(db, first[0].seq, "delivered", attempts=1, status_code=204)
    second, _ = webhooks_outbox.claim_due(db, 10, claim_s=60)
    assert [d.event_type for d in second] == ["job.failed"]
    assert webhooks_outbox.pending_count(db) == 3

    # 410 Gone: the endpoint is disabled for ann, her other pending deliveries to it are dropped,
    # and so is any written later; another endpoint is untouched.
    waiting = admit(db, tmp_path, ann.name, "http://127.0.0.1:9/hook")
    jobs.mark_running_many(db, {waiting.id: 1})
    assert webhooks_outbox.disable_endpoint(db, second[0], attempts=1, status_code=410) == 1
    later = admit(db, tmp_path, ann.name, "http://127.0.0.1:9/hook")
    jobs.mark_running_many(db, {later.id: 1})
    claimed, dropped = webhooks_outbox.claim_due(db, 10, claim_s=0)
    assert dropped == 1 and claimed == []  # cancelled's progress is still claimed (for 60 s)
    assert [r["status"] for r in webhooks_outbox.deliveries_of(db, job.id)] == ["delivered", "disabled"]
    assert [r["status"] for r in webhooks_outbox.deliveries_of(db, waiting.id)] == ["dropped"]
    assert [r["status"] for r in webhooks_outbox.deliveries_of(db, later.id)] == ["dropped"]
    assert webhooks_outbox.pending_count(db) == 2  # the other endpoint's two


sqlite_only = pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)


@sqlite_only  # HTTP and the guard: the database's part is the same as in the other tests
@pytest.mark.parametrize("allow_private", [False, True])
def test_the_deliverer_refuses_a_private_address_at_send_time_unless_allowed(db, tmp_path, make_user,
                                                                            allow_private: bool) -> None:
    ann = make_user("ann", plan="plus")
    receiver = Receiver(free_port()).start()
    receiver.secrets["/hook"] = webhooks_secret.get_secret(db, ann.user_id)
    # Written straight to the outbox, as if the name had resolved publicly when the job was submitted.
    job = admit(db, tmp_path, ann.name, f"http://localhost:{receiver.port}/hook", ["started"])
    jobs.mark_running_many(db, {job.id: 1})
    deliverer = WebhookDeliverer(db, allow_private=allow_private, poll_s=0.05)
    deliverer.start()
    try:
        status = wait_until(lambda: (s := webhooks_outbox.deliveries_of(db, job.id)[0]["status"]) != "pending" and s)
    finally:
        deliverer.stop()
        receiver.stop()
    if allow_private:
        assert status == "delivered"
        (delivery,) = receiver.received
        assert delivery.verified and delivery.headers["host"] == f"localhost:{receiver.port}"
        assert delivery.payload["data"]["id"] == job.id
    else:
        assert status == "refused" and receiver.received == []
        assert "localhost" in webhooks_outbox.deliveries_of(db, job.id)[0]["last_error"]


@sqlite_only
def test_a_redirect_is_not_followed_and_not_a_success(db, tmp_path, make_user) -> None:
    ann = make_user("ann", plan="plus")
    receiver = Receiver(free_port()).start()
    receiver.answer = lambda path, headers: (307, {"Location": "/elsewhere"}) if path == "/hook" else (204, {})
    job = admit(db, tmp_path, ann.name, receiver.url("/hook"), ["started"])
    jobs.mark_running_many(db, {job.id: 1})
    deliverer = WebhookDeliverer(db, allow_private=True, poll_s=0.05, schedule_s=[0.0])  # one try only
    deliverer.start()
    try:
        row = wait_until(lambda: (r := webhooks_outbox.deliveries_of(db, job.id)[0])["status"] != "pending" and r)
    finally:
        deliverer.stop()
        receiver.stop()
    assert row["status"] == "failed" and row["last_status_code"] == 307 and row["attempts"] == 1
    assert [d.path for d in receiver.received] == ["/hook"]


def test_two_deliverers_share_the_outbox_each_event_once_and_each_job_in_order(db, tmp_path, make_user) -> None:
    ann = make_user("ann", plan="plus")
    update_plan(db, "plus", max_concurrent=20)
    receiver = Receiver(free_port()).start()
    receiver.secrets["/hook"] = webhooks_secret.get_secret(db, ann.user_id)
    made = [admit(db, tmp_path, ann.name, receiver.url("/hook")) for _ in range(8)]
    jobs.mark_running_many(db, {job.id: 1 for job in made})
    for job in made:
        jobs.fail_job(db, job.id, "boom", "it broke")
    pair = [WebhookDeliverer(db, allow_private=True, poll_s=0.02, max_concurrent=3) for _ in range(2)]
    for deliverer in pair:
        deliverer.start()
    try:
        got = receiver.wait_for(lambda got: len(got) >= 16)
        wait_until(lambda: webhooks_outbox.pending_count(db) == 0)
    finally:
        for deliverer in pair:
            deliverer.stop()
        receiver.stop()
    assert len(receiver.received) == 16 and all(d.verified for d in receiver.received)
    assert len({d.headers["webhook-id"] for d in got}) == 16  # each once, across both deliverers
    for job in made:
        assert [d.payload["type"] for d in got if d.payload["data"]["id"] == job.id] == ["job.started", "job.failed"]
    assert sum(d.metrics.deliveries.labels("delivered")._value.get() for d in pair) == 16


def test_deliveries_outlive_the_deliverer_and_keep_their_webhook_id(db, tmp_path, make_user) -> None:
    ann = make_user("ann", plan="plus")
    receiver = Receiver(free_port())  # not listening while the first deliverer tries
    receiver.secrets["/hook"] = webhooks_secret.get_secret(db, ann.user_id)
    job = admit(db, tmp_path, ann.name, receiver.url("/hook"), ["started"])
    jobs.mark_running_many(db, {job.id: 1})
    (row,) = webhooks_outbox.deliveries_of(db, job.id)
    first = WebhookDeliverer(db, allow_private=True, poll_s=0.02, schedule_s=[0.0, 0.1, 0.5, 0.5])
    first.start()
    try:
        wait_until(lambda: webhooks_outbox.deliveries_of(db, job.id)[0]["attempts"] >= 2)
    finally:
        first.stop()  # as a scheduler going away: what it could not deliver stays in the outbox
    assert webhooks_outbox.deliveries_of(db, job.id)[0]["status"] == "pending"
    receiver.start()
    second = WebhookDeliverer(db, allow_private=True, poll_s=0.02, schedule_s=[0.0, 0.1, 0.1, 0.1, 0.1])
    second.start()
    try:
        (delivery,) = receiver.wait_for(lambda got: len(got) == 1)
    finally:
        second.stop()
        receiver.stop()
    assert delivery.verified and delivery.headers["webhook-id"] == row["id"]
