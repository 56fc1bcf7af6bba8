"""Webhooks end to end, with a real receiver that verifies every signature (`standardwebhooks`):
a job's events arrive signed and carry the job as GET /v1/jobs/{id} shows it; a receiver that is
down gets them once it is back, in order, each webhook-id accepted once; 410 disables the endpoint;
rotating the secret changes the signing key; private URLs are refused at submit; and no one's
deliveries ever carry, or are signed for, someone else's job."""

from __future__ import annotations

import base64
import re
import time

import httpx
import pytest
from engine_server import engine_settings, free_port
from standardwebhooks import Webhook, WebhookVerificationError
from webhook_receiver import Receiver

from kiln.service import webhooks_outbox

FAST_SCHEDULE = [0.0, 0.2, 0.3, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 2.0]
sqlite_only = pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)


def hook_settings(settings, tmp_path, **overrides):  # type: ignore[no-untyped-def]
    return engine_settings(settings, tmp_path, **{
        "webhook_allow_private": True, "webhook_retry_schedule_s": FAST_SCHEDULE, "webhook_poll_s": 0.1,
        **overrides})


@pytest.fixture
def receiver():  # type: ignore[no-untyped-def]
    running = Receiver(free_port()).start()
    yield running
    running.stop()


def secret_of(http: httpx.Client) -> str:
    response = http.get("/v1/webhooks/secret")
    assert response.status_code == 200, response.text
    return response.json()["secret"]


def submit(http: httpx.Client, url: str, **extra) -> dict:  # type: ignore[no-untyped-def]
    response = http.post("/v1/jobs", json={"prompt": "a kiln at dusk", "webhook_url": url, **extra})
    assert response.status_code == 202, response.text
    return response.json()


def finished(http: httpx.Client, job_id: str, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (job := http.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def metric(http: httpx.Client, outcome: str) -> float:
    found = re.search(rf'^kiln_webhook_deliveries_total{{outcome="{outcome}"}} (\S+)$',
                      http.get("/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_job_s_events_arrive_signed_with_the_job_and_never_cross_users(start_server, settings, tmp_path,
                                                                         make_user, receiver) -> None:
    server = start_server(hook_settings(settings, tmp_path))
    ann, bob = make_user(plan="plus"), make_user(plan="plus")
    with server.client(ann.key) as a, server.client(bob.key) as b:
        ann_secret, bob_secret = secret_of(a), secret_of(b)
        assert ann_secret == secret_of(a) != bob_secret  # made on first read, then the same
        assert ann_secret.startswith("whsec_") and 24 <= len(base64.b64decode(ann_secret[6:])) <= 64
        receiver.secrets.update({"/ann": ann_secret, "/bob": bob_secret})
        job = submit(a, receiver.url("/ann"))
        assert job["webhook_url"] == receiver.url("/ann")
        assert job["webhook_events"] == ["started", "completed", "failed", "cancelled"]  # the default
        bobs = submit(b, receiver.url("/bob"), webhook_events=["completed"])
        receiver.wait_for(lambda got: len(receiver.accepted("/ann")) == 2 and len(receiver.accepted("/bob")) == 1)
        final = finished(a, job["id"])

        got = receiver.accepted("/ann")
        assert all(d.verified for d in receiver.received)
        assert [d.payload["type"] for d in got] == ["job.started", "job.completed"]
        assert got[0].payload["data"]["status"] == "running" and got[0].payload["data"]["id"] == job["id"]
        assert got[1].payload["data"] == final  # the job object, exactly as GET /v1/jobs/{id} has it
        assert final["status"] == "succeeded" and final["image_ids"]
        assert set(got[1].payload) == {"type", "timestamp", "data"}
        assert len({d.headers["webhook-id"] for d in got}) == 2
        assert all(abs(int(d.headers["webhook-timestamp"]) - time.time()) < 60 for d in got)

        (bob_delivery,) = receiver.accepted("/bob")
        assert bob_delivery.payload["data"]["id"] == bobs["id"] and bob_delivery.payload["type"] == "job.completed"
        with pytest.raises(WebhookVerificationError):  # signed with bob's key, never ann's
            Webhook(ann_secret).verify(bob_delivery.body, bob_delivery.headers)
        assert not any(d.payload["data"]["id"] == bobs["id"] for d in got)
        assert b.get(f"/v1/jobs/{job['id']}").status_code == 404

        rotated = a.post("/v1/webhooks/secret/rotate")
        assert rotated.status_code == 200 and rotated.json()["secret"] not in (ann_secret, bob_secret)
        new_secret = rotated.json()["secret"]
        assert secret_of(a) == new_secret and secret_of(b) == bob_secret
        receiver.secrets["/ann"] = new_secret
        again = submit(a, receiver.url("/ann"), webhook_events=["completed"])
        after = receiver.wait_for(lambda got: any(d.payload["data"]["id"] == again["id"] for d in got
                                                  if d.path == "/ann"))[-1]
        assert after.verified
        with pytest.raises(WebhookVerificationError):  # the old key signs nothing any more
            Webhook(ann_secret).verify(after.body, after.headers)

        deadline = time.monotonic() + 10  # the scheduler's series arrive with its heartbeat
        while metric(a, "delivered") < 4:
            assert time.monotonic() < deadline, a.get("/metrics").text
            time.sleep(0.1)
        assert "kiln_webhook_outbox_pending" in a.get("/metrics").text


def test_a_receiver_that_is_down_gets_every_event_once_it_is_back_in_order(start_server, settings, tmp_path,
                                                                            make_user) -> None:
    server = start_server(hook_settings(settings, tmp_path, steps=4, step_s=0.2))
    ann = make_user(plan="plus")
    receiver = Receiver(free_port())  # not listening yet: every try is refused
    answered: list[str] = []

    def answer(path, headers):  # type: ignore[no-untyped-def]
        answered.append(headers["webhook-id"])
        return (503, {"Retry-After": "1"}) if len(answered) == 1 else (204, {})  # busy once, then fine

    receiver.answer = answer
    with server.client(ann.key) as http:
        receiver.secrets["/hook"] = secret_of(http)
        job = submit(http, receiver.url("/hook"), webhook_events=list(webhooks_outbox.EVENTS))
        assert finished(http, job["id"])["status"] == "succeeded"
        db = server.state.db
        deadline = time.monotonic() + 15
        while (first := webhooks_outbox.deliveries_of(db, job["id"])[0])["attempts"] < 2:
            assert time.monotonic() < deadline, first
            time.sleep(0.05)
        assert first["status"] == "pending" and first["last_status_code"] is None  # refused connections
        rows = webhooks_outbox.deliveries_of(db, job["id"])
        receiver.start()
        try:
            receiver.wait_for(lambda got: len(receiver.accepted()) == len(rows))
        finally:
            receiver.stop()
    got = receiver.accepted()
    assert all(d.verified for d in receiver.received)
    assert [d.headers["webhook-id"] for d in got] == [r["id"] for r in rows]  # in order, each once
    types = [d.payload["type"] for d in got]
    assert types[0] == "job.started" and types[-1] == "job.completed"
    assert set(types[1:-1]) == {"job.progress"}, types
    assert answered[0] == answered[1] == rows[0]["id"]  # the 503'd one was tried again as the same message
    assert receiver.received[0].status == 503
    progress = [d.payload["data"]["progress"] for d in got if d.payload["type"] == "job.progress"]
    assert 1 <= len(progress) < 4 and all(p["total"] == 4 for p in progress)  # at most every 500 ms
    deadline = time.monotonic() + 10  # the last answer is recorded just after the receiver saw it
    while {r["status"] for r in webhooks_outbox.deliveries_of(db, job["id"])} != {"delivered"}:
        assert time.monotonic() < deadline, webhooks_outbox.deliveries_of(db, job["id"])
        time.sleep(0.05)


@sqlite_only  # the outbox's 410 handling runs on PostgreSQL in tests/service/test_webhooks_outbox.py
def test_410_gone_disables_the_endpoint_for_that_user(start_server, settings, tmp_path, make_user,
                                                     receiver) -> None:
    server = start_server(hook_settings(settings, tmp_path))
    ann, bob = make_user(plan="plus"), make_user(plan="plus")
    gone = {"/gone"}
    receiver.answer = lambda path, headers: (410, {}) if path in gone else (204, {})
    db = server.state.db
    with server.client(ann.key) as http, server.client(bob.key) as other:
        receiver.secrets.update({"/gone": secret_of(http), "/fine": secret_of(http)})
        first = submit(http, receiver.url("/gone"))
        finished(http, first["id"])

        def settled(job_id: str) -> list[str]:
            rows = webhooks_outbox.deliveries_of(db, job_id)
            return [r["status"] for r in rows] if rows and all(r["status"] != "pending" for r in rows) else []

        deadline = time.monotonic() + 20
        while not settled(first["id"]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert settled(first["id"]) == ["disabled", "dropped"]  # started got 410; completed never sent
        later = submit(http, receiver.url("/gone"))
        elsewhere = submit(http, receiver.url("/fine"))
        finished(http, later["id"])
        receiver.wait_for(lambda got: len(receiver.accepted("/fine")) == 2)
        while not settled(later["id"]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert settled(later["id"]) == ["dropped", "dropped"]
        assert [d.path for d in receiver.received].count("/gone") == 1 and elsewhere["id"]
        assert all(d.verified for d in receiver.received)

        record = http.get(f"/v1/jobs/{later['id']}/webhooks").json()["data"]  # what became of each
        assert [(r["type"], r["status"]) for r in record] == [("job.started", "dropped"), ("job.completed", "dropped")]
        assert other.get(f"/v1/jobs/{later['id']}/webhooks").status_code == 404  # never anyone else's
        assert [e["url"] for e in http.get("/v1/webhooks/disabled").json()["data"]] == [receiver.url("/gone")]
        assert other.get("/v1/webhooks/disabled").json()["data"] == []
        assert other.delete("/v1/webhooks/disabled", params={"url": receiver.url("/gone")}).status_code == 404
        gone.clear()  # the receiver is back; its owner enables the endpoint again
        enabled = http.delete("/v1/webhooks/disabled", params={"url": receiver.url("/gone")})
        assert enabled.status_code == 200 and enabled.json()["data"] == []
        again = submit(http, receiver.url("/gone"), webhook_events=["completed"])
        receiver.wait_for(lambda got: any(d.payload["data"]["id"] == again["id"] for d in receiver.accepted("/gone")))


@sqlite_only
def test_bad_or_private_webhook_urls_are_refused_at_submit_and_nothing_is_charged(start_server, settings,
                                                                                  tmp_path, make_user) -> None:
    server = start_server(engine_settings(settings, tmp_path))  # webhook_allow_private is off by default
    ann = make_user(plan="plus")
    with server.client(ann.key) as http:
        for url in ("ftp://example.com/hook", "http://127.0.0.1:9/hook", "http://10.0.0.1/",
                    "http://169.254.169.254/latest", "http://[::1]/", "http://localhost/", "nonsense"):
            refused = http.post("/v1/jobs", json={"prompt": "a kiln", "webhook_url": url})
            assert refused.status_code == 400, (url, refused.text)
            assert refused.json()["error"]["param"] == "webhook_url", refused.json()
        for body, param in (({"webhook_url": "https://example.com/h", "webhook_events": ["finished"]},
                             "webhook_events"),
                            ({"webhook_events": ["completed"]}, "webhook_events")):
            refused = http.post("/v1/jobs", json={"prompt": "a kiln", **body})
            assert refused.status_code == 400 and refused.json()["error"]["param"].startswith(param), refused.text
        assert http.get("/v1/usage").json()["used"] == 0
        assert http.get("/v1/jobs").json()["data"] == []


@sqlite_only
def test_a_job_cancelled_through_the_api_reports_it_refunded(start_server, settings, tmp_path, make_user,
                                                             receiver) -> None:
    server = start_server(hook_settings(settings, tmp_path, hold=True))  # it stays queued
    ann = make_user(plan="plus")
    with server.client(ann.key) as http:
        receiver.secrets["/hook"] = secret_of(http)
        job = submit(http, receiver.url("/hook"))
        assert http.delete(f"/v1/jobs/{job['id']}").status_code == 200
        (cancelled,) = receiver.wait_for(lambda got: len(got) == 1)
        assert cancelled.verified and cancelled.payload["type"] == "job.cancelled"
        assert cancelled.payload["data"] == http.get(f"/v1/jobs/{job['id']}").json()
        assert cancelled.payload["data"]["charge_state"] == "refunded"
