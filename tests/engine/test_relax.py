"""Relax mode: an idle-only queue that runs only when nothing else can."""

from __future__ import annotations

from .conftest import job_ids, req, run_all


def test_relax_runs_only_when_nothing_else_waits(make_engine, executor, clock):
    engine = make_engine(max_batch_images=1)
    relaxed = req("r", "free", relax=True)
    engine.add_request(relaxed)
    normal = [req(f"n{i}", "free") for i in range(3)]
    for r in normal:
        engine.add_request(r)
    order = [job_ids(b)[0] for b in run_all(engine, executor, clock)]
    assert order[-1] == relaxed.job_id


def test_relax_work_runs_when_idle(make_engine, executor, clock):
    engine = make_engine()
    relaxed = req("r", "free", relax=True)
    engine.add_request(relaxed)
    engine.step()
    assert job_ids(executor.only()) == [relaxed.job_id]


def test_new_paying_work_overtakes_queued_relax_work(make_engine, executor, clock):
    engine = make_engine(max_batch_images=1)
    engine.add_request(req("n0", "free"))
    engine.step()
    relaxed = [req("r", "enterprise", relax=True) for _ in range(3)]
    for r in relaxed:
        engine.add_request(r)
    late = req("late", "free")
    engine.add_request(late)
    executor.complete(executor.only().batch_id)
    order = [job_ids(b)[0] for b in run_all(engine, executor, clock)]
    assert order[0] == late.job_id


def test_relax_and_normal_never_share_a_batch(make_engine, executor, clock):
    engine = make_engine(max_batch_images=8)
    engine.add_request(req("r", relax=True))
    engine.add_request(req("n"))
    batches = run_all(engine, executor, clock)
    assert [len(b.requests) for b in batches] == [1, 1]
