"""The flood path: refusals answered from memory (no database write, and in the steady state no read)
while a paying job keeps its pace; a client that gives up takes its job with it; the API outlives
its scheduler and a restarted scheduler runs what was queued, once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from engine_server import engine_settings, follow, free_port
from sqlalchemy import event

from kiln.service import jobs
from kiln.service.plans import update_plan

sqlite_only = pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)


class StatementCounter:
    """Counts the SQL statements an engine runs (reads and writes) while it is watched."""

    def __init__(self, engine) -> None:  # type: ignore[no-untyped-def]
        self.engine, self.statements = engine, []
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        self.statements.append(statement)

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)


def test_a_thousand_refusals_cost_no_write_and_leave_a_running_job_on_its_pace(
    start_server, settings, tmp_path, make_user, db
) -> None:
    server = start_server(engine_settings(settings, tmp_path, steps=20, step_s=0.05, preview_every_steps=0))
    update_plan(db, "free", images_per_day=1)
    server.state.plans.invalidate()
    crowd, payer = make_user(), make_user(plan="enterprise")
    with server.client(crowd.key) as http:  # the crowd's one image of the day; memory learns it
        assert http.post("/v1/images/generations", json={"prompt": "mine"}).status_code == 200
        assert http.post("/v1/jobs", json={"prompt": "again"}).status_code == 429
    with server.client(payer.key) as http:
        job = http.post("/v1/jobs", json={"prompt": "a paid picture"}).json()
        counter = StatementCounter(server.state.engine)
        stamps: list[float] = []
        flood_done = threading.Event()

        def flood(_: int) -> list[httpx.Response]:
            with httpx.Client(base_url=server.base_url, timeout=30,
                              headers={"Authorization": f"Bearer {crowd.key}"}) as client:
                return [client.post("/v1/jobs", json={"prompt": "please"}) for _ in range(125)]

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(flood, i) for i in range(8)]
            threading.Thread(target=lambda: ([f.result() for f in futures], flood_done.set()),
                             daemon=True).start()
            for step in follow(http, job["id"]):
                if step["event"] == "progress":
                    stamps.append(time.monotonic())
            refusals = [r for f in futures for r in f.result()]
        counter.close()
    assert flood_done.is_set() or len(refusals) == 1000
    assert len(refusals) == 1000 and {r.status_code for r in refusals} == {429}
    assert all(r.json()["error"]["code"] == "quota_exceeded" and int(r.headers["Retry-After"]) > 0
               for r in refusals)
    writes = [s for s in counter.statements
              if s.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE", "BEGIN IMMEDIATE"))]
    assert writes == [], writes[:3]  # the job's own transitions happen in the scheduler's process
    # Reads: the revocation poll and the odd recheck, never one per refusal.
    assert len(counter.statements) < 100, len(counter.statements)
    assert len(stamps) == 20
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    # 50 ms steps; the flood may delay an event through the busy API process (1.05 s once on a slow
    # 2-core machine), never stall the job.
    assert max(gaps) < 2.0, gaps
    with server.client(crowd.key) as http:
        assert http.get("/v1/usage").json()["used"] == 1
        assert len(http.get("/v1/jobs").json()["data"]) == 1  # refusals made no job rows


@sqlite_only
def test_a_client_that_gives_up_cancels_and_refunds_its_job(start_server, settings, tmp_path, make_user) -> None:
    server = start_server(engine_settings(settings, tmp_path, steps=200, step_s=0.1))
    ann = make_user(plan="plus")
    for stream in (False, True):
        with server.client(ann.key) as http:
            before = {j["id"] for j in http.get("/v1/jobs").json()["data"]}
        with pytest.raises(httpx.ReadTimeout), httpx.Client(
            base_url=server.base_url, timeout=httpx.Timeout(30, read=1.5),
            headers={"Authorization": f"Bearer {ann.key}"},
        ) as impatient:
            body = {"prompt": f"too slow {stream}", "stream": stream}
            with impatient.stream("POST", "/v1/images/generations", json=body) as response:
                for _ in response.iter_lines():
                    pass
        with server.client(ann.key) as http:
            deadline = time.monotonic() + 10
            while True:
                (job,) = [j for j in http.get("/v1/jobs").json()["data"] if j["id"] not in before]
                if job["status"] == "cancelled":
                    break
                assert time.monotonic() < deadline, job
                time.sleep(0.05)
            assert job["charge_state"] == "refunded"
            assert http.get("/v1/usage").json()["used"] == 0


def _scheduler_process(config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kiln", "--config", str(config), "serve", "--role", "scheduler"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_the_api_outlives_its_scheduler_and_a_restarted_one_runs_the_queue_once(
    start_server, settings, tmp_path, make_user, db
) -> None:
    update_plan(db, "enterprise", max_concurrent=100)
    settings = engine_settings(settings, tmp_path, steps=2, step_s=0.01).model_copy(update={
        "scheduler_url": f"tcp://127.0.0.1:{free_port()}",
        "scheduler_events_url": f"tcp://127.0.0.1:{free_port()}",
    })
    config = tmp_path / "scheduler.toml"
    config.write_text(
        f'database_url = "{settings.database_url}"\ndata_dir = "{tmp_path}"\n'
        f'images_dir = "{settings.images_dir}"\nscheduler_url = "{settings.scheduler_url}"\n'
        f'scheduler_events_url = "{settings.scheduler_events_url}"\ndefault_model = "fake"\n'
        "max_batch_wait_s = 0.0\n[models.fake]\n"
        f'path = "{tmp_path / "model"}"\nloader = "kiln.testing:load_fake_pipeline"\n'
        "native_size = 64\nsteps = 2\noptions = { step_s = 0.01 }\n"
    )
    scheduler = _scheduler_process(config)
    try:
        api = start_server(settings, scheduler=False)  # waits for the scheduler's heartbeat
        ann = make_user(plan="enterprise")
        with api.client(ann.key) as http:
            assert http.post("/v1/images/generations", json={"prompt": "before"}).status_code == 200
            scheduler.send_signal(signal.SIGKILL)
            scheduler.wait(10)
            gone = time.monotonic()
            while (refused := http.post("/v1/images/generations", json={"prompt": "during"})).status_code == 200:
                assert time.monotonic() - gone < 10
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_is_overloaded"
            assert int(refused.headers["Retry-After"]) >= 1
            assert time.monotonic() - gone < 10  # answered within the scheduler timeout, never hung
            queued = [http.post("/v1/jobs", json={"prompt": f"kept {i}", "seed": i}) for i in range(5)]
            assert {r.status_code for r in queued} == {202}  # durable: they wait for a scheduler
            ids = [r.json()["id"] for r in queued]
            scheduler = _scheduler_process(config)
            outcomes = [api.call(api.state.runner.wait(job_id, 90), 120) for job_id in ids]
            assert [o.status for o in outcomes] == ["succeeded"] * 5
            views = [jobs.get_job(db, job_id) for job_id in ids]
            assert all(v.attempts == 1 and v.charge_state == "committed" and len(v.image_ids) == 1
                       for v in views)
            assert http.get("/v1/usage").json()["used"] == 6
            assert http.get("/readyz").json()["checks"]["scheduler"] == "ok"
    finally:
        scheduler.terminate()
        scheduler.wait(30)
