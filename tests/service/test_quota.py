"""The quota ledger: atomic reservations, exact refunds and the UTC day, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor

import pytest

from kiln.db.engine import write_transaction
from kiln.errors import QuotaExceeded, RateLimited
from kiln.service import jobs, quota
from kiln.service.accounts import get_user
from kiln.service.clock import FakeClock
from kiln.service.plans import get_plan, update_plan
from kiln.service.storage_directory import DirectoryImageStore


def spec(n: int = 1, prompt: str = "a cat") -> jobs.JobSpec:
    return jobs.JobSpec(kind="generate", model="fake", prompt=prompt, n=n, width=64, height=64, steps=4,
                        guidance_scale=1.0, seed=1, params={"output_format": "png"})


def admit(db, store, name, clock, **kwargs):  # type: ignore[no-untyped-def]
    account = get_user(db, name)
    return jobs.create_job(db, store, account=account, plan=get_plan(db, account.plan_name), spec=spec(),
                           now=clock.now(), **kwargs)


@pytest.fixture
def store(tmp_path) -> DirectoryImageStore:  # type: ignore[no-untyped-def]
    return DirectoryImageStore(tmp_path / "images")


def used(db, user_id: str, clock: FakeClock) -> int:  # type: ignore[no-untyped-def]
    return jobs.usage_of(db, user_id, get_plan(db, "free"), clock.now()).used


def test_day_boundary_and_retry_after(db, store, make_user) -> None:
    ann = make_user("ann")
    clock = FakeClock(dt.datetime(2026, 5, 1, 23, 59, 50, tzinfo=dt.UTC))
    update_plan(db, "free", max_concurrent=10)
    for _ in range(3):
        admit(db, store, "ann", clock)
    with pytest.raises(QuotaExceeded) as refused:
        admit(db, store, "ann", clock)
    assert refused.value.retry_after_s == pytest.approx(10)
    clock.advance(11)  # 00:00:01 the next UTC day
    job = admit(db, store, "ann", clock).job
    assert job.charge_state == "reserved" and used(db, ann.user_id, clock) == 1
    usage = jobs.usage_of(db, ann.user_id, get_plan(db, "free"), clock.now())
    assert usage.resets_at == dt.datetime(2026, 5, 3, tzinfo=dt.UTC) and usage.remaining == 2


def test_a_local_midnight_is_not_a_reset(db, store, make_user) -> None:
    make_user("bob")
    update_plan(db, "free", max_concurrent=10)
    tokyo = dt.timezone(dt.timedelta(hours=9))
    clock = FakeClock(dt.datetime(2026, 5, 2, 8, 0, tzinfo=tokyo))  # 23:00 UTC on May 1st
    for _ in range(3):
        admit(db, store, "bob", clock)
    clock.set(dt.datetime(2026, 5, 2, 8, 30, tzinfo=tokyo))  # still May 1st in UTC
    with pytest.raises(QuotaExceeded):
        admit(db, store, "bob", clock)


def test_refund_happens_exactly_once(db, store, make_user, clock) -> None:
    ann = make_user("ann")
    job = admit(db, store, "ann", clock).job
    assert used(db, ann.user_id, clock) == 1
    assert jobs.fail_job(db, job.id, "generation_failed", "boom") is True
    assert jobs.fail_job(db, job.id, "generation_failed", "boom") is False
    assert jobs.cancel_job(db, job.id, ann.user_id).status == "failed"
    with write_transaction(db) as session:
        assert quota.refund(session, job.id) is False
    assert used(db, ann.user_id, clock) == 0
    assert jobs.get_job(db, job.id).charge_state == "refunded"


def test_complete_is_idempotent_and_commits_the_charge(db, store, make_user, clock) -> None:
    from PIL import Image

    ann = make_user("ann")
    job = admit(db, store, "ann", clock).job
    picture = Image.new("RGB", (64, 64), (1, 2, 3))
    first = jobs.complete_job(db, store, job.id, [picture])
    second = jobs.complete_job(db, store, job.id, [picture])
    assert first == second and len(first) == 1
    assert jobs.fail_job(db, job.id, "late", "too late") is False  # a stored image is never refunded
    view = jobs.get_job(db, job.id)
    assert view.status == "succeeded" and view.charge_state == "committed"
    assert used(db, ann.user_id, clock) == 1
    assert len(list((store.root / ann.user_id).iterdir())) == 1


def test_cancel_then_late_completion_stores_nothing(db, store, make_user, clock) -> None:
    ann = make_user("ann")
    job = admit(db, store, "ann", clock).job
    assert jobs.cancel_job(db, job.id, ann.user_id).status == "cancelled"
    assert jobs.complete_job(db, store, job.id, [b"not even an image"]) == []
    assert used(db, ann.user_id, clock) == 0


def test_the_last_image_goes_to_exactly_one_of_many_threads(db, store, make_user, clock) -> None:
    ann = make_user("ann")
    update_plan(db, "free", max_concurrent=100)
    for _ in range(2):
        admit(db, store, "ann", clock)

    def attempt(_: int) -> str:
        try:
            admit(db, store, "ann", clock)
            return "ok"
        except QuotaExceeded:
            return "quota"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, range(16)))
    assert outcomes.count("ok") == 1 and outcomes.count("quota") == 15
    assert used(db, ann.user_id, clock) == 3


def test_concurrency_cap_refuses_without_charging(db, store, make_user, clock) -> None:
    ann = make_user("ann", plan="plus")  # 3 jobs at once
    for _ in range(3):
        admit(db, store, "ann", clock)
    with pytest.raises(RateLimited):
        admit(db, store, "ann", clock)
    assert jobs.usage_of(db, ann.user_id, get_plan(db, "plus"), clock.now()).used == 3
