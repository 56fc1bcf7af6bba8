"""Events per job, in order; requeues after lost workers and failed batches; idempotent adds."""

from __future__ import annotations

from kiln.engine import Cancelled, Completed, Failed, Position, Progress, Queued, Requeued, Started

from .conftest import job_ids, req


def kinds(events, job_id):
    return [type(e).__name__ for e in events if e.job_id == job_id]


def test_events_in_order(make_engine, executor, clock):
    engine = make_engine(max_batch_images=1)
    first, second = req("a"), req("b")
    engine.add_request(first)
    engine.add_request(second)
    events = engine.step()
    batch = executor.only()
    executor.progress(batch.batch_id, 1)
    executor.progress(batch.batch_id, 2)
    events += engine.step()
    executor.complete(batch.batch_id)
    events += engine.step()
    executor.complete(executor.only().batch_id)
    events += engine.step()
    assert kinds(events, first.job_id) == ["Queued", "Started", "Progress", "Progress", "Completed"]
    assert kinds(events, second.job_id) == ["Queued", "Position", "Started", "Completed"]
    started = next(e for e in events if isinstance(e, Started) and e.job_id == first.job_id)
    assert started.attempt == 1
    progress = [e for e in events if isinstance(e, Progress)]
    assert [(p.step, p.total) for p in progress] == [(1, 4), (2, 4)]
    done = next(e for e in events if isinstance(e, Completed) and e.job_id == first.job_id)
    assert done.images == (f"{first.job_id}:0".encode(),)


def test_add_request_is_idempotent_by_job_id(make_engine, executor, clock):
    engine = make_engine()
    job = req()
    assert engine.add_request(job)
    assert not engine.add_request(job)
    engine.step()
    executor.complete(executor.only().batch_id)
    engine.step()
    assert not engine.add_request(job)  # finished: a re-submission does not run it twice
    engine.step()
    assert len(executor.submitted) == 1


def test_resubmitted_job_keeps_its_attempt_count(make_engine, executor, clock):
    engine = make_engine(max_attempts=3)
    again = req(attempts=1)
    engine.add_request(again)
    started = [e for e in engine.step() if isinstance(e, Started)]
    assert started[0].attempt == 2
    spent = req(attempts=3)
    engine.add_request(spent)
    failed = [e for e in engine.step() if isinstance(e, Failed)]
    assert [(e.job_id, e.code) for e in failed] == [(spent.job_id, "too_many_attempts")]


def test_lost_worker_reruns_the_batch_with_each_request_alone(make_engine, executor, clock):
    engine = make_engine(max_batch_images=4)
    a, b = req("a"), req("b")
    engine.add_request(a)
    engine.add_request(b)
    engine.step()
    executor.lose(executor.only().batch_id)
    events = engine.step()  # update: requeued
    events += engine.step()  # schedule: started again
    assert [type(e) for e in events if e.job_id == a.job_id] == [Requeued, Position, Started]
    assert len(executor.only().requests) == 1  # isolated, so the next death names the culprit
    executor.complete(executor.only().batch_id)
    engine.step()
    executor.complete(executor.only().batch_id)
    events = engine.step()
    assert {e.job_id for e in events if isinstance(e, Completed)} <= {a.job_id, b.job_id}
    assert not engine.has_work()


def test_poison_request_fails_after_three_lost_workers_others_complete(make_engine, executor, clock):
    engine = make_engine(max_batch_images=4)
    poison, good = req("a", prompt="poison"), req("b")
    engine.add_request(poison)
    engine.add_request(good)
    events = engine.step()
    while engine.has_work():
        events += engine.step()
        for batch in list(executor.running.values()):
            if poison.job_id in job_ids(batch):
                executor.lose(batch.batch_id)
            else:
                executor.complete(batch.batch_id)
    failed = [e for e in events if isinstance(e, Failed)]
    assert [(e.job_id, e.code) for e in failed] == [(poison.job_id, "worker_crashed")]
    assert [e.job_id for e in events if isinstance(e, Completed)] == [good.job_id]
    assert [e.attempt for e in events if isinstance(e, Started) and e.job_id == poison.job_id] == [1, 2, 3]


def test_failed_batch_isolates_then_fails_only_the_bad_request(make_engine, executor, clock):
    engine = make_engine(max_batch_images=4)
    bad, good = req("a", prompt="bad"), req("b")
    engine.add_request(bad)
    engine.add_request(good)
    engine.step()
    executor.fail(executor.only().batch_id, "out_of_memory")
    events = engine.step()
    while engine.has_work():
        events += engine.step()
        for batch in list(executor.running.values()):
            if bad.job_id in job_ids(batch):
                executor.fail(batch.batch_id, "out_of_memory")
            else:
                executor.complete(batch.batch_id)
    assert [(e.job_id, e.code) for e in events if isinstance(e, Failed)] == [(bad.job_id, "out_of_memory")]
    assert [e.job_id for e in events if isinstance(e, Completed)] == [good.job_id]


def test_single_request_failure_fails_at_once(make_engine, executor, clock):
    engine = make_engine()
    job = req()
    engine.add_request(job)
    engine.step()
    executor.fail(executor.only().batch_id)
    events = engine.step()
    assert [type(e) for e in events] == [Failed]
    assert not isinstance(events[0], (Cancelled, Position, Queued))
