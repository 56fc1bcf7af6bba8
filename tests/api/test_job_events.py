"""The Jobs API over the engine and real worker processes: submit with a queue position, follow a job
as server-sent events (in order, resumable), cancel queued and running jobs (refunded, never across
users), admission's degrade-then-503, partial images in OpenAI's stream, and /metrics."""

from __future__ import annotations

import base64
import io
import time

import pytest
from engine_server import engine_settings, events_until_end, follow, release
from PIL import Image

from kiln.service import jobs
from kiln.service.plans import update_plan

sqlite_only = pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)


@sqlite_only
def test_one_job_s_events_in_order_then_resumed_after_last_event_id(start_server, settings, tmp_path,
                                                                    make_user) -> None:
    server = start_server(engine_settings(settings, tmp_path, steps=4, step_s=0.01, preview_every_steps=2))
    ann = make_user(plan="plus")
    with server.client(ann.key) as http:
        submitted = http.post("/v1/jobs", json={"prompt": "a kiln at dusk", "seed": 3})
        assert submitted.status_code == 202, submitted.text
        job = submitted.json()
        assert job["status"] == "queued" and job["queue_position"] == 0 and job["eta_s"] >= 0
        events = events_until_end(http, job["id"])
        names = [e["event"] for e in events]
        assert names[0] == "queued" and names[-1] == "completed", names
        assert names.index("started") < names.index("progress") < names.index("completed")
        assert [e["id"] for e in events] == sorted({e["id"] for e in events})  # numbered, increasing
        assert events[0]["data"].keys() >= {"queue_position", "eta_s"}
        assert next(e for e in events if e["event"] == "started")["data"] == {"attempt": 1}
        last_progress = [e for e in events if e["event"] == "progress"][-1]["data"]
        assert last_progress["step"] == last_progress["total"] == 4
        preview = Image.open(io.BytesIO(base64.b64decode(last_progress["preview"])))
        assert preview.format == "PNG"
        done = http.get(f"/v1/jobs/{job['id']}").json()
        assert events[-1]["data"] == {"image_ids": done["image_ids"]} and len(done["image_ids"]) == 1
        assert http.get(f"/v1/images/{done['image_ids'][0]}/content").status_code == 200  # stored first

        started = next(e["id"] for e in events if e["event"] == "started")
        resumed = events_until_end(http, job["id"], last_event_id=started)
        assert [e["event"] for e in resumed] == ["progress", "completed"]
        assert all(e["id"] > started for e in resumed)
        assert events_until_end(http, job["id"], last_event_id=events[-1]["id"]) == []  # 204: seen it all


def test_cancel_queued_and_running_is_refunded_and_never_crosses_users(start_server, settings, tmp_path,
                                                                       make_user, db) -> None:
    update_plan(db, "plus", max_concurrent=5)
    server = start_server(engine_settings(settings, tmp_path, steps=200, step_s=0.02, hold=True))
    ann, bob = make_user(plan="plus"), make_user(plan="plus")
    with server.client(ann.key) as http, server.client(bob.key) as other:
        running = http.post("/v1/jobs", json={"prompt": "a long one"}).json()
        queued = http.post("/v1/jobs", json={"prompt": "next in line"}).json()
        assert queued["queue_position"] == 1
        for method, path in [("GET", ""), ("DELETE", ""), ("GET", "/events")]:
            stranger = other.request(method, f"/v1/jobs/{queued['id']}{path}")
            assert stranger.status_code == 404 and stranger.json()["error"]["code"] == "not_found"
        assert [j["id"] for j in other.get("/v1/jobs").json()["data"]] == []

        cancelled = http.delete(f"/v1/jobs/{queued['id']}").json()
        assert cancelled["status"] == "cancelled" and cancelled["charge_state"] == "refunded"
        assert [e["event"] for e in events_until_end(http, queued["id"])][-1] == "cancelled"
        release(tmp_path)
        for event in follow(http, running["id"]):
            if event["event"] == "progress":
                break  # it is drawing now
        stopped = http.delete(f"/v1/jobs/{running['id']}").json()
        assert stopped["status"] == "cancelled" and stopped["charge_state"] == "refunded"
        assert [e["event"] for e in events_until_end(http, running["id"])][-1] == "cancelled"
        assert http.get("/v1/usage").json()["used"] == 0
        # the worker stopped at the next step and takes the next job; the cancelled one never ran
        after = http.post("/v1/images/generations", json={"prompt": "after", "quality": "low"})
        assert after.status_code == 200, after.text
        assert jobs.get_job(server.state.db, queued["id"]).attempts == 0
        assert http.get("/v1/usage").json()["used"] == 1


@sqlite_only
def test_admission_degrades_then_refuses_with_retry_after(start_server, settings, tmp_path, make_user,
                                                          db) -> None:
    # One 64x64 image of 4 steps is 1/16 of a work unit; at 1/16 unit/s each queued image is 1 s of wait.
    update_plan(db, "free", max_concurrent=10, images_per_day=100, wait_target_s=1.6)
    server = start_server(engine_settings(settings, tmp_path, hold=True, throughput_prior_units_per_s=0.0625))
    ann = make_user()
    with server.client(ann.key) as http:
        answers = [http.post("/v1/jobs", json={"prompt": f"cat {i}"}) for i in range(6)]
        assert [a.status_code for a in answers] == [202] * 5 + [503]
        assert [a.json().get("degraded") is not None for a in answers[:5]] == [False, False, True, True, True]
        degraded = answers[2].json()["degraded"]
        assert degraded["steps_from"] == 4 and degraded["steps_to"] == 2 and degraded["size_to"] == "64x64"
        assert answers[2].headers["x-kiln-degraded"] == "steps=4->2; size=64x64->64x64"
        refused = answers[5]
        assert refused.json()["error"]["code"] == "server_is_overloaded"
        assert int(refused.headers["Retry-After"]) >= 1 and "x-ratelimit-remaining-images" in refused.headers
        assert http.get("/v1/usage").json()["used"] == 5  # the refusal reserved nothing
        metrics = http.get("/metrics").text
        assert 'kiln_admission_refusals_total{plan="free",reason="overloaded"} 1.0' in metrics
        assert 'kiln_admission_degraded_total{plan="free"} 3.0' in metrics
        release(tmp_path)
        ids = [a.json()["id"] for a in answers[:5]]
        outcomes = [server.call(server.state.runner.wait(job_id, 60), 90) for job_id in ids]
        assert [o.status for o in outcomes] == ["succeeded"] * 5
        assert jobs.get_job(db, ids[2]).steps == 2 and jobs.get_job(db, ids[0]).steps == 4


@sqlite_only
def test_stream_sends_partial_images_then_completed(start_server, settings, tmp_path, make_user) -> None:
    server = start_server(engine_settings(settings, tmp_path, steps=6, step_s=0.01))
    ann = make_user(plan="plus")
    stream = server.openai(ann.key).images.generate(prompt="a teapot", stream=True, partial_images=2,
                                                      extra_body={"seed": 1})
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    final = Image.open(io.BytesIO(base64.b64decode(events[-1].b64_json)))
    assert final.size == (64, 64)


@sqlite_only
def test_metrics_expose_the_engine_series_and_quota_refusals(start_server, settings, tmp_path,
                                                            make_user) -> None:
    server = start_server(engine_settings(settings, tmp_path))
    ann = make_user()  # free: 3 images a day
    with server.client(ann.key) as http:
        for i in range(3):
            assert http.post("/v1/images/generations", json={"prompt": f"a cat {i}"}).status_code == 200
        assert http.post("/v1/images/generations", json={"prompt": "one more"}).status_code == 429
        # The scheduler's series come with its heartbeat (a few times a second): the next one has them.
        deadline = time.monotonic() + 5
        while "kiln_images_generated_total 3.0" not in (response := http.get("/metrics")).text:
            assert time.monotonic() < deadline, response.text
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for series in ('kiln_images_generated_total 3.0', 'kiln_queue_wait_seconds_count{plan="free"} 3.0',
                   'kiln_gpu_seconds_total{plan="free"}', 'kiln_batch_images_count 3.0',
                   'kiln_images_per_second', 'kiln_queue_depth{plan="free"}',
                   'kiln_admission_refusals_total{plan="free",reason="quota_exceeded"} 1.0'):
        assert series in text, series
    assert "kiln_gpu_temperature_celsius" not in text  # no GPU here: absent, not faked


def test_a_relax_plan_past_its_quota_waits_in_the_slow_lane_uncharged(start_server, settings, tmp_path,
                                                                      make_user, db) -> None:
    update_plan(db, "free", images_per_day=1, max_concurrent=2, relax_mode=True)
    server = start_server(engine_settings(settings, tmp_path))
    ann = make_user()
    with server.client(ann.key) as http:
        first = http.post("/v1/jobs", json={"prompt": "within the quota"}).json()
        assert first["relax"] is False
        assert [e["event"] for e in follow(http, first["id"])][-1] == "completed"
        relaxed = http.post("/v1/jobs", json={"prompt": "past the quota"})
        assert relaxed.status_code == 202 and relaxed.json()["relax"] is True
        assert [e["event"] for e in follow(http, relaxed.json()["id"])][-1] == "completed"
        assert http.get("/v1/usage").json()["used"] == 1
    update_plan(db, "free", relax_mode=False)
    server.state.plans.invalidate()
    with server.client(ann.key) as http:
        refused = http.post("/v1/jobs", json={"prompt": "no slow lane"})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"


@sqlite_only
def test_a_job_with_image_id_edits_your_own_image_and_no_one_else_s(start_server, settings, tmp_path,
                                                                     make_user) -> None:
    server = start_server(engine_settings(settings, tmp_path, steps=2))
    ann, bob = make_user(plan="plus"), make_user(plan="plus")
    with server.client(ann.key) as http, server.client(bob.key) as other:
        first = http.post("/v1/jobs", json={"prompt": "a red circle", "seed": 1}).json()
        image_id = events_until_end(http, first["id"])[-1]["data"]["image_ids"][0]

        assert other.post("/v1/jobs", json={"prompt": "mine now", "image_id": image_id}).status_code == 404
        edit = http.post("/v1/jobs", json={"prompt": "make it blue", "image_id": image_id, "strength": 0.5})
        assert edit.status_code == 202, edit.text
        assert edit.json()["kind"] == "edit"
        assert events_until_end(http, edit.json()["id"])[-1]["event"] == "completed"
        missing = http.post("/v1/jobs", json={"prompt": "x", "image_id": "img_nope"})
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "image_id"
        assert http.get("/v1/usage").json()["used"] == 2  # the refused ones cost nothing
