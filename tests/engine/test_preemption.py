"""Preemption: a running lower-weight batch is stopped at a step boundary for waiting paying work,
requeued at the head of its queue, at most max_preemptions times, and not charged twice."""

from __future__ import annotations

from kiln.engine import Completed, Requeued, Started

from .conftest import KEY, job_ids, req


def test_paying_work_preempts_a_free_batch(make_engine, executor, clock):
    engine = make_engine(max_batch_images=8, preemption="preempt", max_preemptions=1)
    frees = [req(f"f{i}", "free") for i in range(8)]
    for r in frees:
        engine.add_request(r)
    engine.step()
    free_batch = executor.only()
    executor.progress(free_batch.batch_id, 1)
    engine.step()
    plus = req("p", "plus", key=KEY._replace(steps=9))
    engine.add_request(plus)
    engine.step()
    assert executor.cancels == [free_batch.batch_id]
    executor.stopped(free_batch.batch_id)
    events = engine.step()
    events += engine.step()
    assert {e.reason for e in events if isinstance(e, Requeued)} == {"preempted"}
    assert job_ids(executor.only()) == [plus.job_id]
    executor.complete(executor.only().batch_id)
    events += engine.step()
    again = executor.only()
    assert sorted(job_ids(again)) == sorted(r.job_id for r in frees)  # whole batch, at the head
    executor.progress(again.batch_id, 1)
    engine.add_request(req("p2", "plus", key=KEY._replace(steps=9)))
    events += engine.step()
    assert executor.cancels == [free_batch.batch_id]  # preempted once, never again
    executor.complete(again.batch_id)
    events += engine.step()
    assert {e.job_id for e in events if isinstance(e, Completed)} >= {r.job_id for r in frees}
    starts = [e.attempt for e in events if isinstance(e, Started) and e.job_id == frees[0].job_id]
    assert starts == [2]


def test_no_preemption_past_the_progress_limit(make_engine, executor, clock):
    engine = make_engine(preemption="preempt", preempt_max_progress=0.5)
    engine.add_request(req("f", "free"))
    engine.step()
    executor.progress(executor.only().batch_id, 3, 4)
    engine.step()
    engine.add_request(req("p", "plus"))
    engine.step()
    assert executor.cancels == []


def test_equal_weight_never_preempts(make_engine, executor, clock):
    engine = make_engine(preemption="preempt")
    engine.add_request(req("a", "plus"))
    engine.step()
    engine.add_request(req("b", "plus", key=KEY._replace(steps=9)))
    engine.step()
    assert executor.cancels == []


def test_preempted_work_is_not_charged_twice(make_engine, executor, clock):
    engine = make_engine(max_batch_images=1, preemption="preempt")
    first = req("f", "free")
    engine.add_request(first)
    engine.step()
    charged = engine.queue._stride.passes["free"]
    engine.add_request(req("p", "enterprise"))
    engine.step()
    executor.stopped(executor.only().batch_id)
    engine.step()
    assert engine.queue._stride.passes["free"] < charged  # refunded
