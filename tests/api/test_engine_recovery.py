"""Nothing lost, nothing charged twice, through the HTTP API over real worker processes: a restart with
50 jobs queued, a worker killed mid-batch, a poison job, and a flood of free requests beside a
paying user."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
from engine_server import engine_settings, follow

from kiln.service import jobs
from kiln.service.plans import update_plan
from kiln.testing import FakePipeline

sqlite_only = pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)


def test_a_restart_with_50_jobs_queued_runs_all_50_once(start_server, settings, tmp_path, make_user, db) -> None:
    update_plan(db, "enterprise", max_concurrent=100)
    first = start_server(engine_settings(settings, tmp_path, hold=True))  # its workers never get ready
    ann = make_user(plan="enterprise")
    with first.client(ann.key) as http:
        submitted = [http.post("/v1/jobs", json={"prompt": f"cat {i}", "seed": i}) for i in range(50)]
    assert {r.status_code for r in submitted} == {202}
    first.stop()
    ids = [r.json()["id"] for r in submitted]
    assert {jobs.get_job(db, job_id).status for job_id in ids} == {"queued"}  # kept, still charged

    second = start_server(engine_settings(settings, tmp_path))
    outcomes = [second.call(second.state.runner.wait(job_id, 120), 150) for job_id in ids]
    assert [o.status for o in outcomes] == ["succeeded"] * 50
    views = [jobs.get_job(db, job_id) for job_id in ids]
    assert all(len(v.image_ids) == 1 and v.charge_state == "committed" and v.attempts == 1 for v in views)
    with second.client(ann.key) as http:
        assert http.get("/v1/usage").json()["used"] == 50


def test_a_worker_killed_mid_batch_reruns_the_job_and_charges_once(start_server, settings, tmp_path,
                                                                   make_user) -> None:
    server = start_server(engine_settings(settings, tmp_path, steps=50, step_s=0.02))
    ann = make_user(plan="plus")
    executor = server.scheduler.executor
    with server.client(ann.key) as http:
        job = http.post("/v1/jobs", json={"prompt": "a survivor"}).json()
        seen, killed = [], False
        for event in follow(http, job["id"]):
            seen.append(event["event"])
            if event["event"] == "progress" and not killed:
                (pid,) = executor.worker_pids()
                os.kill(pid, signal.SIGKILL)  # mid-batch, as a segfaulting kernel would
                killed = True
        assert seen.count("started") == 2 and "requeued" in seen and seen[-1] == "completed", seen
        done = http.get(f"/v1/jobs/{job['id']}").json()
        assert done["status"] == "succeeded" and done["attempts"] == 2 and len(done["image_ids"]) == 1
        assert http.get(f"/v1/images/{done['image_ids'][0]}/content").status_code == 200
        assert http.get("/v1/usage").json()["used"] == 1


@sqlite_only  # the executor's tests cover the rest; once through HTTP proves the wiring
def test_a_poison_job_fails_refunded_after_three_worker_deaths_and_the_others_run(start_server, settings,
                                                                                 tmp_path, make_user) -> None:
    server = start_server(engine_settings(settings, tmp_path, step_s=0.01))
    ann, bob = make_user(plan="plus"), make_user(plan="plus")
    with server.client(ann.key) as http, server.client(bob.key) as other:
        poison = http.post("/v1/jobs", json={"prompt": f"{FakePipeline.crash_marker} poison"}).json()
        fine = [other.post("/v1/jobs", json={"prompt": f"fine {i}"}).json() for i in range(2)]
        poisoned = [e for e in follow(http, poison["id"])]
        assert [e["event"] for e in poisoned].count("requeued") == 2
        assert poisoned[-1]["event"] == "failed" and poisoned[-1]["data"]["error"]["code"] == "worker_crashed"
        view = http.get(f"/v1/jobs/{poison['id']}").json()
        assert view["status"] == "failed" and view["charge_state"] == "refunded"
        assert http.get("/v1/usage").json()["used"] == 0
        for job in fine:
            assert [e["event"] for e in follow(other, job["id"])][-1] == "completed"
        assert other.get("/v1/usage").json()["used"] == 2
    assert server.scheduler.executor.restarts == 3


@sqlite_only
def test_a_flood_of_free_requests_beside_a_paying_user(start_server, settings, tmp_path, make_user, db) -> None:
    update_plan(db, "free", max_concurrent=100, images_per_day=1000, wait_target_s=0.001)
    server = start_server(engine_settings(settings, tmp_path, step_s=0.02))
    free, paying = make_user(), make_user(plan="enterprise")

    def flood(i: int):  # type: ignore[no-untyped-def]
        with server.client(free.key) as http:
            return http.post("/v1/images/generations", json={"prompt": f"free {i}"})

    def enterprise(i: int):  # type: ignore[no-untyped-def]
        with server.client(paying.key) as http:
            answer = http.post("/v1/images/generations", json={"prompt": f"paid {i}"})
            return answer, http.get("/healthz")

    with ThreadPoolExecutor(44) as pool:
        flooding = [pool.submit(flood, i) for i in range(40)]
        paid = [pool.submit(enterprise, i) for i in range(3)]
        free_answers = [f.result(120) for f in flooding]
        paid_answers = [f.result(120) for f in paid]
    statuses = [r.status_code for r in free_answers]
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
    for refused in (r for r in free_answers if r.status_code == 503):
        assert refused.json()["error"]["code"] == "server_is_overloaded"
        assert int(refused.headers["Retry-After"]) >= 1
    assert [(a.status_code, h.status_code) for a, h in paid_answers] == [(200, 200)] * 3
    with server.client(free.key) as http:
        assert http.get("/v1/usage").json()["used"] == statuses.count(200)  # refusals cost nothing
        assert len(http.get("/v1/jobs", params={"limit": 100}).json()["data"]) == statuses.count(200)
        metrics = http.get("/metrics").text
    refusals = f'kiln_admission_refusals_total{{plan="free",reason="overloaded"}} {statuses.count(503)}.0'
    assert refusals in metrics
