"""Quotas over HTTP: honest 429s with Retry-After and rate-limit headers, the UTC day, live plan changes,
the per-plan concurrency cap, and refunds when the pipeline fails."""

from __future__ import annotations

import datetime as dt
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from engine_server import engine_settings, release

from kiln.service.plans import update_plan
from kiln.testing import FakePipeline

HEADERS = ("x-ratelimit-limit-images", "x-ratelimit-remaining-images", "x-ratelimit-reset-images")


def generate(http, prompt: str = "a cat", **body):  # type: ignore[no-untyped-def]
    return http.post("/v1/images/generations", json={"prompt": prompt, **body})


def test_quota_runs_out_honestly_and_resets_at_utc_midnight(server, make_user, clock) -> None:
    clock.set(dt.datetime(2026, 3, 14, 23, 58, 20, tzinfo=dt.UTC))
    ann = make_user()
    with server.client(ann.key) as http:
        for remaining in (2, 1, 0):
            ok = generate(http)
            assert ok.status_code == 200, ok.text
            assert ok.headers["x-ratelimit-remaining-images"] == str(remaining)
            assert ok.headers["x-ratelimit-limit-images"] == "3"
        refused = generate(http)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "quota_exceeded"
        assert refused.headers["Retry-After"] == "100"
        assert refused.headers["x-ratelimit-remaining-images"] == "0"
        assert refused.headers["x-ratelimit-reset-images"] == "100s"
        clock.advance(101)
        usage = http.get("/v1/usage").json()
        assert usage == {"object": "usage", "plan": "free", "used": 0, "limit": 3, "remaining": 3,
                         "resets_at": "2026-03-16T00:00:00+00:00"}
        assert generate(http).status_code == 200


def test_sdk_sees_quota_exceeded(server, make_user, db) -> None:
    update_plan(db, "free", images_per_day=0)
    server.state.plans.invalidate()
    ann = make_user()
    with pytest.raises(openai.RateLimitError) as refused:
        server.openai(ann.key).images.generate(prompt="x")
    assert refused.value.code == "quota_exceeded"
    assert int(refused.value.response.headers["retry-after"]) > 0


def test_plans_set_reaches_a_running_server_within_seconds(server, make_user, settings, tmp_path) -> None:
    import subprocess

    ann = make_user()
    config = tmp_path / "cli.toml"
    config.write_text(f'database_url = "{settings.database_url}"\n')
    with server.client(ann.key) as http:
        assert http.get("/v1/usage").json()["limit"] == 3
        subprocess.run([sys.executable, "-m", "kiln", "--config", str(config), "plans", "set", "free",
                        "--images-per-day", "5"], check=True, capture_output=True, timeout=60)
        changed = time.monotonic()
        while http.get("/v1/usage").json()["limit"] != 5:
            assert time.monotonic() - changed < 5, "the new limit did not arrive within 5 s"
            time.sleep(0.05)


def held_server(start_server, settings, clock, tmp_path):  # type: ignore[no-untyped-def]
    """A server whose workers stay loading (every job stays queued) until `release(tmp_path)`."""
    return start_server(engine_settings(settings, tmp_path, hold=True), clock=clock)


def watch_waits(runner) -> threading.Event:  # type: ignore[no-untyped-def]
    """An event set when a request starts waiting for a job's outcome."""
    waiting = threading.Event()
    wait = runner.wait

    async def watched(job_id: str, timeout_s: float):  # type: ignore[no-untyped-def]
        waiting.set()
        return await wait(job_id, timeout_s)

    runner.wait = watched
    return waiting


def test_concurrency_cap_and_cancel_refund(start_server, settings, clock, make_user, tmp_path) -> None:
    server = held_server(start_server, settings, clock, tmp_path)
    ann = make_user()
    with server.client(ann.key) as http:
        first = http.post("/v1/jobs", json={"prompt": "a cat"})
        assert first.status_code == 202 and first.json()["status"] == "queued"
        busy = generate(http)
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "rate_limit_exceeded"
        assert "Retry-After" in busy.headers and all(h in busy.headers for h in HEADERS)
        assert http.get("/v1/usage").json()["used"] == 1
        cancelled = http.delete(f"/v1/jobs/{first.json()['id']}").json()
        assert cancelled["status"] == "cancelled" and cancelled["charge_state"] == "refunded"
        assert http.get("/v1/usage").json()["used"] == 0
        second = http.post("/v1/jobs", json={"prompt": "a dog"}).json()
        release(tmp_path)
        done = server.call(server.state.runner.wait(second["id"], 30), 40)
        assert done.status == "succeeded"
        listed = http.get("/v1/jobs").json()["data"]
        assert [j["status"] for j in listed] == ["succeeded", "cancelled"]


@pytest.mark.parametrize("marker", [FakePipeline.oom_marker, FakePipeline.fail_marker])
def test_pipeline_failure_is_a_500_and_refunded_once(server, make_user, marker) -> None:
    ann = make_user()
    with server.client(ann.key) as http:
        failed = generate(http, f"a cat {marker}")
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "generation_failed"
        assert "refunded" in failed.json()["error"]["message"]
        assert http.get("/v1/usage").json()["used"] == 0
        job = http.get("/v1/jobs").json()["data"][0]
        assert job["charge_state"] == "refunded" and job["status"] == "failed"
        assert generate(http).status_code == 200
        assert http.get("/v1/usage").json()["used"] == 1


def test_twenty_concurrent_requests_with_one_idempotency_key(server, make_user) -> None:
    ann = make_user(plan="plus")
    headers = {"Idempotency-Key": "order-42"}

    def send(_: int):  # type: ignore[no-untyped-def]
        with server.client(ann.key) as http:
            return http.post("/v1/images/generations", json={"prompt": "a cat", "seed": 1}, headers=headers)

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(send, range(20)))
    assert [r.status_code for r in responses] == [200] * 20, responses[0].text
    assert len({r.json()["id"] for r in responses}) == 1
    assert len({r.json()["data"][0]["b64_json"] for r in responses}) == 1
    with server.client(ann.key) as http:
        assert http.get("/v1/usage").json()["used"] == 1
        assert len(http.get("/v1/jobs").json()["data"]) == 1
        other = http.post("/v1/images/generations", json={"prompt": "a dog"}, headers=headers)
    assert other.status_code == 422 and other.json()["error"]["param"] == "Idempotency-Key"


def test_same_key_while_the_first_is_running_waits_for_the_same_job(start_server, settings, clock,
                                                                     make_user, tmp_path) -> None:
    server = held_server(start_server, settings, clock, tmp_path)
    waiting = watch_waits(server.state.runner)
    ann = make_user()
    body, headers = {"prompt": "a cat", "seed": 4}, {"Idempotency-Key": "k-1"}
    with server.client(ann.key) as http:
        first = http.post("/v1/jobs", json=body, headers=headers).json()
        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(http.post, "/v1/images/generations", json=body, headers=headers)
            assert waiting.wait(10)  # the retry is waiting on the held job
            assert not second.done()
            release(tmp_path)
            answer = second.result(30)
        assert answer.status_code == 200 and answer.json()["id"] == first["id"]
        assert http.get("/v1/usage").json()["used"] == 1
