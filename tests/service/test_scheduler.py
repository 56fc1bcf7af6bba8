"""The scheduler and the job leases: a live holder's jobs are never taken, a dead holder's are
adopted by exactly one scheduler and run again with their attempts, charged once."""

from __future__ import annotations

import asyncio
import datetime as dt
from concurrent.futures import ThreadPoolExecutor

from engine_server import engine_settings

from kiln.db.models import utcnow
from kiln.engine import EngineMetrics, build_local_engine
from kiln.service import job_leases, jobs
from kiln.service.accounts import get_user
from kiln.service.plan_cache import PlanCache
from kiln.service.plans import get_plan, update_plan
from kiln.service.scheduler import Scheduler
from kiln.service.storage_directory import DirectoryImageStore


def admit(db, store, clock, prompt: str) -> str:  # type: ignore[no-untyped-def]
    account = get_user(db, "ann")
    spec = jobs.JobSpec(kind="generate", model="fake", prompt=prompt, n=1, width=64, height=64, steps=2,
                        guidance_scale=1.0, seed=5, params={"output_format": "png"})
    return jobs.create_job(db, store, account=account, plan=get_plan(db, account.plan_name), spec=spec,
                           now=clock.now()).job.id


def test_leases_decide_who_may_take_a_job(db, settings, make_user, clock) -> None:
    make_user("ann")
    update_plan(db, "free", max_concurrent=5, images_per_day=10)
    store = DirectoryImageStore(settings.images_dir)
    now = utcnow()
    live, dead, young, old = (admit(db, store, clock, p) for p in ("live", "dead", "young", "old"))
    job_leases.lease_jobs(db, [live], "live-server", now + dt.timedelta(seconds=30))
    job_leases.lease_jobs(db, [dead], "dead-server", now - dt.timedelta(seconds=1))
    jobs.mark_running(db, dead, attempt=1)
    job_leases.lease_jobs(db, [old], "nobody", now - dt.timedelta(seconds=1))  # then forget the holder:
    with db.begin() as session:
        from kiln.db.models import Job

        session.get(Job, old).lease_expires_at = None
        session.get(Job, old).created_at = now - dt.timedelta(seconds=60)

    def sweep(name: str) -> list[str]:
        return [v.id for v in job_leases.adopt_orphans(db, name, 30.0, now=now, grace_s=30.0)]

    with ThreadPoolExecutor(2) as pool:  # two servers sweep at once: each job goes to one of them
        claims = list(pool.map(sweep, ["a", "b"]))
    assert sorted(claims[0] + claims[1]) == sorted([dead, old])
    adopted = jobs.get_job(db, dead)
    assert adopted.status == "queued" and adopted.attempts == 1 and adopted.charge_state == "reserved"
    assert jobs.get_job(db, live).status == "queued" and young not in claims[0] + claims[1]


async def test_a_dead_server_s_running_job_is_adopted_and_run_again_charged_once(
    db, settings, make_user, clock, tmp_path
) -> None:
    from prometheus_client import CollectorRegistry

    ann = make_user("ann")
    store = DirectoryImageStore(settings.images_dir)
    orphan = admit(db, store, clock, "a fox")  # started by a server that then died
    job_leases.lease_jobs(db, [orphan], "dead-server", utcnow() - dt.timedelta(seconds=1))
    jobs.mark_running(db, orphan, attempt=1)
    engine, executor = build_local_engine(engine_settings(settings, tmp_path),
                                          metrics=EngineMetrics(CollectorRegistry()))
    updates: list = []
    done = asyncio.Event()

    def publish(update) -> None:  # type: ignore[no-untyped-def]
        updates.append(update)
        if update.name in ("completed", "failed", "cancelled"):
            done.set()

    scheduler = Scheduler(db, store, PlanCache(db, 1.0), engine, executor, scheduler_id="live",
                          lease_s=30.0, publish=publish)
    await scheduler.start()
    try:
        await asyncio.wait_for(done.wait(), 60)
    finally:
        await scheduler.stop()
    view = jobs.get_job(db, orphan)
    assert view.status == "succeeded" and view.attempts == 2 and view.charge_state == "committed"
    names = [u.name for u in updates if u.job_id == orphan]
    assert names[0] == "queued" and names[-1] == "completed" and "started" in names
    assert updates[-1].charge_state == "committed" and updates[-1].user_id == ann.user_id
    assert jobs.usage_of(db, ann.user_id, get_plan(db, "free"), clock.now()).used == 1
