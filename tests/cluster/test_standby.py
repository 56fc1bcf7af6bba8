"""One active scheduler, one standby (`kiln serve --role scheduler` twice on one database): the
standby runs no engine, takes over within seconds of the active one's kill -9, and runs every job the
dead one left — each to one success, charged once — while API processes follow whichever is active."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from engine_server import free_port
from sqlalchemy import func, select

from kiln.db.models import Image, Job, QuotaUsage
from kiln.service.leadership import FileLeadership, PostgresLeadership
from kiln.service.plans import update_plan

JOBS = 50
TAKEOVER_S = 10.0


class SchedulerProcess:
    """`kiln serve --role scheduler` with a config of its own; its log kept in a file."""

    def __init__(self, tmp_path: Path, name: str, settings, control: str, events: str) -> None:  # type: ignore[no-untyped-def]
        self.name, self.control, self.events = name, control, events
        self.config = tmp_path / f"{name}.toml"
        self.log = tmp_path / f"{name}.log"
        self.config.write_text(
            f'database_url = "{settings.database_url}"\ndata_dir = "{tmp_path / name}"\n'
            f'images_dir = "{settings.images_dir}"\nscheduler_url = "{control}"\n'
            f'scheduler_events_url = "{events}"\nscheduler_id = "{name}"\ndefault_model = "fake"\n'
            "max_batch_wait_s = 0.0\nscheduler_standby_poll_s = 0.5\n[models.fake]\n"
            f'path = "{tmp_path / "model"}"\nloader = "kiln.testing:load_fake_pipeline"\n'
            "native_size = 64\nsteps = 2\n"
            f'options = {{ step_s = 0.05, hold_until = "{tmp_path / "release-workers"}" }}\n'
        )
        self.process: subprocess.Popen | None = None

    def start(self) -> SchedulerProcess:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kiln", "--config", str(self.config), "serve", "--role", "scheduler"],
                stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _until(condition, timeout_s: float, what: str, logs: list[SchedulerProcess]):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {s.name}\n{s.log.read_text()[-3000:]}" for s in logs)
            raise AssertionError(f"{what} within {timeout_s}s\n{tails}")
        time.sleep(0.05)
    return result


@pytest.mark.parametrize("empty_database_url", ["postgres"], indirect=True)
def test_the_standby_takes_over_from_a_killed_scheduler_and_runs_its_jobs_once(
    start_server, settings, tmp_path, make_user, db
) -> None:
    """On PostgreSQL, the cluster's database (on SQLite the same code runs under a file lock, tested
    below; a second process pair would cost the suite 20 s more)."""
    update_plan(db, "enterprise", max_concurrent=200)
    a, b = (SchedulerProcess(tmp_path, name, settings, f"tcp://127.0.0.1:{free_port()}",
                             f"tcp://127.0.0.1:{free_port()}") for name in ("sched-a", "sched-b"))
    both = [a, b]
    api_settings = settings.model_copy(update={
        "scheduler_url": f"{a.control},{b.control}", "scheduler_events_url": f"{a.events},{b.events}",
        "scheduler_timeout_s": 3.0,
    })
    for process in both:  # at once: whichever takes the lock first is the active one
        process.start()
    try:
        api = start_server(api_settings, scheduler=False)  # waits for an active heartbeat
        runner = api.state.runner
        _until(lambda: runner.link.standbys() == 1, 60, "the other says it stands by", both)
        active, standby = both if runner.scheduler_id == "sched-a" else both[::-1]
        assert runner.scheduler_id == active.name  # a standby never takes requests
        ann = make_user(plan="enterprise")
        with api.client(ann.key) as http, ThreadPoolExecutor(4) as pool:
            queued = list(pool.map(lambda i: http.post("/v1/jobs", json={"prompt": f"job {i}", "seed": i}),
                                   range(JOBS)))
            assert {r.status_code for r in queued} == {202}
            ids = [r.json()["id"] for r in queued]
            (tmp_path / "release-workers").touch()  # the active one's worker loads and starts on the queue

            def succeeded() -> int:
                with db() as session:
                    return session.scalar(select(func.count()).where(Job.id.in_(ids), Job.status == "succeeded"))

            _until(lambda: succeeded() >= 1, 60, "the active one finished a job", both)
            active.kill()
            killed = time.monotonic()
            assert succeeded() < JOBS, "it finished everything before the kill: nothing left to take over"
            # Requests in flight while no scheduler is active: no answer to their Admit, so queued
            during = list(pool.map(lambda i: http.post("/v1/jobs", json={"prompt": f"during {i}"}), range(4)))
            _until(lambda: runner.scheduler_id == standby.name, TAKEOVER_S, "the standby took over", both)
            took_over_s = time.monotonic() - killed
            assert {r.status_code for r in during} == {202}  # durable: kept for whichever scheduler is next
            ids += [r.json()["id"] for r in during]
            outcomes = [api.call(runner.wait(job_id, 60), 90) for job_id in ids]
            assert [o.status for o in outcomes] == ["succeeded"] * len(ids), outcomes
        with db() as session:
            rows = session.execute(select(Job.charge_state, Job.charge_units, Job.attempts, Job.worker_id)
                                   .where(Job.id.in_(ids))).all()
            images = dict(session.execute(select(Image.job_id, func.count()).where(Image.job_id.in_(ids))
                                          .group_by(Image.job_id)).all())
            ledger = session.scalar(select(func.sum(QuotaUsage.used)).where(QuotaUsage.user_id == ann.user_id))
        assert all(r.charge_state == "committed" and r.charge_units == 1 for r in rows)
        assert images == {job_id: 1 for job_id in ids}  # one success each: no job's images twice
        assert ledger == len(ids)  # charged once each, across the takeover
        assert all(1 <= r.attempts <= 2 for r in rows)  # a job running at the kill ran once more
        assert standby.name in {r.worker_id for r in rows}
        assert took_over_s < TAKEOVER_S
    finally:
        for process in both:
            process.stop()


@pytest.mark.parametrize("empty_database_url", ["postgres"], indirect=True)
def test_postgres_leadership_is_one_holder_and_passes_on_when_its_session_dies(database_url) -> None:
    from sqlalchemy import create_engine, text

    first, second = PostgresLeadership(database_url), PostgresLeadership(database_url)
    try:
        assert first.try_acquire() and first.held()
        assert not second.try_acquire() and not second.held()
        pid = first._conn.execute(text("SELECT pg_backend_pid()")).scalar_one()  # its session ends
        killer = create_engine(database_url, isolation_level="AUTOCOMMIT")
        with killer.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        killer.dispose()
        assert not first.held()  # the holder finds out at its next re-check
        deadline = time.monotonic() + 10
        while not second.try_acquire():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert second.held()
    finally:
        first.release()
        second.release()


def test_file_leadership_is_one_holder_until_released(tmp_path) -> None:
    first, second = FileLeadership(tmp_path / "lock"), FileLeadership(tmp_path / "lock")
    assert first.try_acquire() and first.held()
    assert not second.try_acquire()
    first.release()
    assert second.try_acquire() and second.held() and not first.held()
    second.release()



def test_an_api_process_sends_to_the_active_scheduler_that_started_last() -> None:
    """A link per scheduler; standbys and silent ones are never chosen, nor an old leader that has
    not noticed yet that a newer one took over."""
    from kiln.service.channel import SchedulerLinks
    from kiln.service.messages import Status

    now = [100.0]
    heard: list[str] = []
    links = SchedulerLinks("tcp://a:1, tcp://b:1", "tcp://a:2,tcp://b:2", on_update=lambda _u: None,
                           on_status=lambda s: heard.append(s.scheduler_id), timeout_s=2.0,
                           monotonic=lambda: now[0])
    a, b = links.links

    def beat(index: int, name: str, role: str, started_at: float) -> None:
        links._heard(index, Status(name, started_at, 1, now[0], role=role))

    assert links.active() is None
    beat(0, "a", "active", 1.0)
    beat(1, "b", "standby", 2.0)
    assert links.active() is a and links.standbys() == 1 and heard == ["a"]
    now[0] += 1.0
    beat(1, "b", "active", 50.0)  # b took over while a's last heartbeat is still fresh
    assert links.active() is b
    beat(0, "a", "active", 1.0)
    assert links.active() is b and heard == ["a", "b"]  # the old leader is not heard as the active one
    now[0] += 2.5  # b silent for longer than the timeout, a too
    assert links.active() is None
    with pytest.raises(Exception, match="as many schedulers"):
        SchedulerLinks("tcp://a:1,tcp://b:1", "tcp://a:2", on_update=lambda _u: None,
                       on_status=lambda _s: None, timeout_s=1.0)
