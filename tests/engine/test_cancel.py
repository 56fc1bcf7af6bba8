"""Cancel: a queued job never runs; a running one stops at the next step; never another user's."""

from __future__ import annotations

from kiln.engine import Cancelled, Completed

from .conftest import job_ids, req, run_all


def test_cancelled_queued_job_never_runs(make_engine, executor, clock):
    engine = make_engine(max_batch_images=1)
    keep, drop = req("a"), req("a")
    engine.add_request(keep)
    engine.add_request(drop)
    assert engine.cancel(drop.job_id, "a")
    ran = {i for b in run_all(engine, executor, clock) for i in job_ids(b)}
    assert ran == {keep.job_id}
    assert engine.queue_position(drop.job_id) is None


def test_cancelled_running_job_stops_its_batch(make_engine, executor, clock):
    engine = make_engine()
    job = req("a")
    engine.add_request(job)
    engine.step()
    batch = executor.only()
    engine.step()
    assert engine.cancel(job.job_id)
    assert executor.cancels == [batch.batch_id]
    events = engine.step()
    assert [type(e) for e in events] == [Cancelled]
    executor.stopped(batch.batch_id)  # the worker stopped at the next step boundary
    assert engine.step() == [] and not engine.has_work()


def test_cancel_in_a_shared_batch_leaves_the_others_running(make_engine, executor, clock):
    engine = make_engine(max_batch_images=4)
    a, b = req("a"), req("b")
    engine.add_request(a)
    engine.add_request(b)
    engine.step()
    batch = executor.only()
    engine.cancel(a.job_id)
    assert executor.cancels == []
    executor.complete(batch.batch_id)
    done = [e.job_id for e in engine.step() if isinstance(e, Completed)]
    assert done == [b.job_id]


def test_cancel_never_crosses_users(make_engine, executor, clock):
    engine = make_engine()
    alice = req("alice", prompt="same", seed=3)
    bob = req("bob", prompt="same", seed=3)  # shares alice's computation
    engine.add_request(alice)
    engine.add_request(bob)
    assert not engine.cancel(bob.job_id, "alice")  # not hers
    assert engine.cancel(alice.job_id, "alice")
    engine.step()
    batch = executor.only()  # bob's copy still runs
    executor.complete(batch.batch_id)
    events = engine.step()
    assert [(type(e), e.job_id) for e in events if isinstance(e, (Completed, Cancelled))] == [(Completed, bob.job_id)]


def test_cancel_of_a_running_shared_job_keeps_the_batch_for_the_other_owner(make_engine, executor, clock):
    engine = make_engine()
    alice = req("alice", prompt="same", seed=3)
    engine.add_request(alice)
    engine.step()
    bob = req("bob", prompt="same", seed=3)
    engine.add_request(bob)
    engine.cancel(alice.job_id)
    assert executor.cancels == []
    executor.complete(executor.only().batch_id)
    assert [e.job_id for e in engine.step() if isinstance(e, Completed)] == [bob.job_id]


def test_cancel_unknown_or_finished_is_false(make_engine, executor, clock):
    engine = make_engine()
    job = req()
    engine.add_request(job)
    run_all(engine, executor, clock)
    assert not engine.cancel(job.job_id)
    assert not engine.cancel("nope")
