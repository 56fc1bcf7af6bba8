"""InlineJobRunner: runs admitted jobs through run_batch and ends each with complete, fail or cancel."""

from __future__ import annotations

import pytest

from kiln.service import jobs
from kiln.service.accounts import get_user
from kiln.service.plans import get_plan, update_plan
from kiln.service.runner import InlineJobRunner
from kiln.service.storage import ImageStore
from kiln.testing import FakePipeline
from kiln.worker.registry import ModelRegistry


def admit(db, store, clock, prompt: str) -> str:  # type: ignore[no-untyped-def]
    account = get_user(db, "ann")
    spec = jobs.JobSpec(kind="generate", model="fake", prompt=prompt, n=1, width=64, height=64, steps=2,
                        guidance_scale=1.0, seed=5, params={"output_format": "png"})
    return jobs.create_job(db, store, account=account, plan=get_plan(db, account.plan_name), spec=spec,
                           now=clock.now()).job.id


@pytest.mark.parametrize("marker, code", [(FakePipeline.oom_marker, "out_of_memory"),
                                          (FakePipeline.fail_marker, "generation_failed")])
async def test_a_failing_pipeline_refunds_once(db, settings, make_user, clock, marker, code) -> None:
    ann = make_user("ann")
    update_plan(db, "free", max_concurrent=5)
    store = ImageStore(settings.images_dir)
    runner = InlineJobRunner(db, ModelRegistry.from_settings(settings), store)
    await runner.start()
    try:
        bad = admit(db, store, clock, f"draw {marker}")
        good = admit(db, store, clock, "draw a cat")
        await runner.submit(bad)
        await runner.submit(good)
        failed = await runner.wait(bad, 30)
        succeeded = await runner.wait(good, 30)
    finally:
        await runner.stop()
    assert failed.status == "failed" and failed.error_code == code
    assert succeeded.status == "succeeded" and len(succeeded.image_ids) == 1
    assert jobs.get_job(db, bad).charge_state == "refunded"
    assert jobs.fail_job(db, bad, code, "again") is False
    assert jobs.usage_of(db, ann.user_id, get_plan(db, "free"), clock.now()).used == 1


async def test_cancel_while_queued_never_runs(db, settings, make_user, clock) -> None:
    ann = make_user("ann")
    store = ImageStore(settings.images_dir)
    runner = InlineJobRunner(db, ModelRegistry.from_settings(settings), store)
    job_id = admit(db, store, clock, "a dog")
    jobs.cancel_job(db, job_id, ann.user_id)
    await runner.start()
    try:
        await runner.submit(job_id)
        outcome = await runner.wait(job_id, 30)
    finally:
        await runner.stop()
    assert outcome.status == "cancelled" and outcome.image_ids == ()
    assert jobs.usage_of(db, ann.user_id, get_plan(db, "free"), clock.now()).used == 0


async def test_stopping_refunds_jobs_that_never_started(db, settings, make_user, clock) -> None:
    ann = make_user("ann")
    store = ImageStore(settings.images_dir)
    runner = InlineJobRunner(db, ModelRegistry.from_settings(settings), store, concurrency=0)
    await runner.start()
    job_id = admit(db, store, clock, "a bird")
    await runner.submit(job_id)
    await runner.stop()
    assert jobs.get_job(db, job_id).status == "cancelled"
    assert jobs.usage_of(db, ann.user_id, get_plan(db, "free"), clock.now()).used == 0


async def test_jobs_of_a_killed_server_are_reaped_and_refunded(db, settings, make_user, clock) -> None:
    import datetime as dt

    from kiln.db.models import utcnow

    ann = make_user("ann")
    store = ImageStore(settings.images_dir)
    orphan = admit(db, store, clock, "a fox")  # admitted by a server that then died
    jobs.lease_jobs(db, [orphan], "dead-server", utcnow() - dt.timedelta(seconds=1))
    runner = InlineJobRunner(db, ModelRegistry.from_settings(settings), store)
    await runner.start()
    await runner.stop()
    view = jobs.get_job(db, orphan)
    assert view.status == "failed" and view.error_code == "worker_lost" and view.charge_state == "refunded"
    assert jobs.usage_of(db, ann.user_id, get_plan(db, "free"), clock.now()).used == 0
