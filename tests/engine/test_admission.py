"""Admission: expected wait from the queue and measured throughput; degrade, then refuse with a
Retry-After from the same estimate; queue_position and eta_s for queued jobs."""

from __future__ import annotations

import pytest

from kiln.errors import Overloaded

from .conftest import KEY, req

# KEY is 64×64 at 4 steps: 4 × (64·64)/(512·512) = 1/16 work unit per image.
UNIT = KEY.units_per_image()


def test_empty_server_admits_as_is(make_engine):
    engine = make_engine(throughput_prior_units_per_s=1.0)
    admitted = engine.admit(req(plan="plus"))
    assert admitted.degraded is None and admitted.expected_wait_s == 0.0


def test_wait_comes_from_the_queue_and_the_prior(make_engine):
    engine = make_engine(throughput_prior_units_per_s=UNIT)  # one image per second
    for i in range(10):
        engine.add_request(req(f"f{i}", "free"))
    assert engine.admit(req("late", "free")).expected_wait_s == pytest.approx(10.0)
    # a plus request sees only 1/4 of the free backlog per unit of its own plan's work
    assert engine.admit(req("p", "plus")).expected_wait_s == pytest.approx(0.25)


def test_measured_throughput_replaces_the_prior(make_engine, executor, clock):
    engine = make_engine(throughput_prior_units_per_s=UNIT)
    engine.add_request(req("a", n=4))
    engine.step()
    executor.complete(executor.only().batch_id, duration_s=0.5)  # 8 images/s measured
    engine.step()
    for i in range(8):
        engine.add_request(req(f"f{i}"))
    assert engine.admit(req("late")).expected_wait_s == pytest.approx(1.0)


def test_over_target_degrades_then_refuses_with_retry_after(make_engine):
    engine = make_engine(throughput_prior_units_per_s=UNIT, refuse_at_target_x=2.0)
    # plus: target 30 s. 40 queued plus images from other users → 40 s: degrade.
    for i in range(40):
        engine.add_request(req(f"p{i}", "plus"))
    wanted = req("me", "plus", key=KEY._replace(steps=8))
    admitted = engine.admit(wanted)
    assert admitted.degraded is not None
    assert (admitted.degraded.steps_from, admitted.degraded.steps_to) == (8, 4)
    assert admitted.request.key.steps == 4 and admitted.request.job_id == wanted.job_id
    # 70 queued → 70 s > 60 s: refused, Retry-After = the time for the queue to drain to 60 s
    for i in range(30):
        engine.add_request(req(f"q{i}", "plus"))
    with pytest.raises(Overloaded) as refused:
        engine.admit(req("me", "plus"))
    assert refused.value.retry_after_s == pytest.approx(10.0)
    assert refused.value.status_code == 503


def test_degrade_respects_min_steps_and_may_shrink_the_size(make_engine):
    engine = make_engine(throughput_prior_units_per_s=UNIT)
    for i in range(40):
        engine.add_request(req(f"p{i}", "plus"))
    big = KEY._replace(width=1024, height=768, steps=4)
    admitted = engine.admit(req("me", "plus", key=big, min_steps=4, allow_smaller=True))
    assert admitted.degraded is not None
    assert admitted.degraded.size_to == (512, 384) and admitted.request.key.steps == 4
    plain = engine.admit(req("me", "plus", key=big, min_steps=4))
    assert plain.degraded is None  # nothing it allows to change: admitted as asked


def test_admission_changes_nothing(make_engine, executor):
    engine = make_engine(throughput_prior_units_per_s=UNIT)
    engine.admit(req())
    engine.step()
    assert not executor.submitted and not engine.has_work()


def test_queue_position_and_eta(make_engine, executor, clock):
    engine = make_engine(throughput_prior_units_per_s=UNIT, max_batch_images=1)
    jobs = [req(f"u{i}") for i in range(3)]
    for r in jobs:
        engine.add_request(r)
    assert [engine.queue_position(r.job_id) for r in jobs] == [0, 1, 2]
    assert [engine.eta_s(r.job_id) for r in jobs] == pytest.approx([0.0, 1.0, 2.0])
    engine.step()
    assert engine.queue_position(jobs[0].job_id) == 0 and engine.eta_s(jobs[0].job_id) == 0.0
    assert engine.queue_position(jobs[2].job_id) == 1
    assert engine.eta_s(jobs[2].job_id) == pytest.approx(2.0)  # the running one's work, then one more
    assert engine.queue_position("nope") is None


def test_relax_requests_are_never_refused(make_engine):
    engine = make_engine(throughput_prior_units_per_s=UNIT)
    for i in range(300):
        engine.add_request(req(f"p{i}", "free"))
    with pytest.raises(Overloaded):
        engine.admit(req("me", "free"))
    admitted = engine.admit(req("me", "free", relax=True))
    assert admitted.degraded is None and admitted.expected_wait_s == pytest.approx(300.0)


def test_queued_event_guesses_the_position_from_the_fair_order(make_engine):
    from kiln.engine import Queued

    engine = make_engine()
    for i in range(10):
        engine.add_request(req("hog", "free"))
    newcomer = req("new", "plus")
    engine.add_request(newcomer)
    queued = [e for e in engine.step() if isinstance(e, Queued) and e.job_id == newcomer.job_id]
    assert queued[0].position == 0
