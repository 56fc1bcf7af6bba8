"""Packing: equal keys share a batch up to the image cap, a partial batch waits at most
max_batch_wait_s, identical seeded requests are computed once, low-priority batches are bounded."""

from __future__ import annotations

import pytest

from kiln.engine import Completed, EngineConfig, EngineCore

from .conftest import KEY, FakeExecutor, job_ids, req, run_all


def test_different_keys_never_share_a_batch(make_engine, executor, clock):
    engine = make_engine(max_batch_images=8)
    keys = [KEY, KEY._replace(steps=8), KEY._replace(width=128), KEY._replace(model="other"), KEY._replace(task="edit")]
    key_of = {}
    for i in range(20):
        r = req(f"u{i}", key=keys[i % len(keys)])
        key_of[r.job_id] = r.key
        engine.add_request(r)
    batches = run_all(engine, executor, clock)
    assert len(batches) == len(keys)
    for batch in batches:
        ids = job_ids(batch)
        assert len({key_of[i] for i in ids}) == 1
        key = key_of[ids[0]]
        assert (batch.spec.model, batch.spec.task, batch.spec.width, batch.spec.steps) == (
            key.model, key.task, key.width, key.steps)


def test_batch_is_capped_in_images(make_engine, executor, clock):
    engine = make_engine(max_batch_images=4)
    for i in range(5):
        engine.add_request(req(f"u{i}", n=2))
    sizes = [sum(r.n for r in b.requests) for b in run_all(engine, executor, clock)]
    assert sizes == [4, 4, 2]


def test_a_request_bigger_than_the_cap_still_runs_alone(make_engine, executor, clock):
    engine = make_engine(max_batch_images=2)
    big = req(n=5)
    engine.add_request(big)
    batches = run_all(engine, executor, clock)
    assert [job_ids(b) for b in batches] == [[big.job_id]]


def test_partial_batch_waits_at_most_max_wait(make_engine, executor, clock):
    engine = make_engine(max_batch_images=4, max_batch_wait_s=0.05)
    first = req("a")
    engine.add_request(first)
    engine.step()
    assert not executor.running  # held for company
    assert engine.next_wake_at == clock.now + 0.05
    clock.advance(0.03)
    second = req("b")
    engine.add_request(second)
    engine.step()
    assert not executor.running
    clock.advance(0.02)  # the oldest has now waited max_batch_wait_s
    engine.step()
    assert job_ids(executor.only()) == [first.job_id, second.job_id]


def test_full_batch_goes_at_once(make_engine, executor, clock):
    engine = make_engine(max_batch_images=2, max_batch_wait_s=10.0)
    engine.add_request(req("a"))
    engine.add_request(req("b"))
    engine.step()
    assert len(executor.only().requests) == 2


def test_identical_seeded_requests_are_computed_once(make_engine, executor, clock):
    engine = make_engine(max_batch_images=8)
    a = req("alice", prompt="a red fox", seed=7, n=2)
    b = req("bob", prompt="a red fox", seed=7, n=2)
    c = req("carol", prompt="a red fox", seed=8, n=2)  # another seed: other images
    for r in (a, b, c):
        engine.add_request(r)
    engine.step()
    batch = executor.only()
    assert sorted(job_ids(batch)) == sorted([a.job_id, c.job_id])
    executor.complete(batch.batch_id)
    done = {e.job_id: e for e in engine.step() if isinstance(e, Completed)}
    assert set(done) == {a.job_id, b.job_id, c.job_id}
    assert done[a.job_id].images == done[b.job_id].images and len(done[b.job_id].images) == 2
    assert done[a.job_id].shared_with == 1 and done[c.job_id].shared_with == 0


def test_identical_request_joins_a_running_batch(make_engine, executor, clock):
    engine = make_engine()
    a = req("alice", prompt="owl", seed=1)
    engine.add_request(a)
    engine.step()
    batch = executor.only()
    b = req("bob", prompt="owl", seed=1)
    engine.add_request(b)
    executor.complete(batch.batch_id)
    done = {e.job_id for e in engine.step() if isinstance(e, Completed)}
    assert done == {a.job_id, b.job_id}
    assert len(executor.submitted) == 1


def test_edits_are_never_shared(make_engine, executor, clock):
    engine = make_engine()
    a = req("alice", prompt="owl", seed=1, key=KEY._replace(task="edit"), init_image=b"png")
    b = req("bob", prompt="owl", seed=1, key=KEY._replace(task="edit"), init_image=b"png")
    engine.add_request(a)
    engine.add_request(b)
    engine.step()
    assert len(executor.only().requests) == 2


def test_low_priority_batch_is_bounded_while_paying_work_arrives(make_engine, executor, clock):
    engine = make_engine(max_batch_images=8, preemption="bound", bound_batch_images=2)
    for i in range(8):
        engine.add_request(req(f"f{i}", "free"))
    engine.step()
    assert len(executor.only().requests) == 8  # nobody better around: full batches
    executor.complete(executor.only().batch_id)
    engine.add_request(req("p", "plus", key=KEY._replace(steps=9)))
    for i in range(8):
        engine.add_request(req(f"g{i}", "free"))
    engine.step()
    assert executor.only().spec.steps == 9  # the paying request first
    executor.complete(executor.only().batch_id)
    engine.step()
    assert len(executor.only().requests) == 2  # plus arrived recently: free batches stay short
    executor.complete(executor.only().batch_id)
    clock.advance(31)  # no paying arrival within bound_window_s: full batches again
    engine.step()
    assert len(executor.only().requests) == 6


def test_bounding_is_off_when_disabled(make_engine, executor, clock):
    engine = make_engine(max_batch_images=8, preemption="off")
    engine.add_request(req("p", "plus", key=KEY._replace(steps=9)))
    executor.slots = 2
    for i in range(8):
        engine.add_request(req(f"f{i}", "free"))
    engine.step()
    sizes = sorted(len(b.requests) for b in executor.submitted)
    assert sizes == [1, 8]


def test_paying_batch_takes_few_low_priority_riders_while_bounding(make_engine, executor, clock):
    engine = make_engine(max_batch_images=8, preemption="bound", bound_batch_images=2)
    plus = req("p", "plus")
    engine.add_request(plus)
    for i in range(8):
        engine.add_request(req(f"f{i}", "free"))
    engine.step()
    batch = executor.only()
    assert job_ids(batch)[0] == plus.job_id and len(batch.requests) == 3  # plus + 2 free riders



@pytest.mark.parametrize(("slots", "side", "first_free_batch"), [(64, 64, 8), (1, 1024, 2)])
def test_bounding_applies_only_where_workers_free_up_rarely(clock, slots, side, first_free_batch):
    """64 workers on small images: one frees every few ms, so free batches stay full while plus
    waits; one worker on 1024² images (a full batch ≈ 48 s): free work rides two images at a time."""
    executor = FakeExecutor(slots=slots)
    key = KEY._replace(width=side, height=side, steps=30)
    config = EngineConfig(max_batch_images=8, preemption="bound", bound_batch_images=2, max_batch_wait_s=0.0)
    engine = EngineCore(executor, config, clock=clock)  # type: ignore[arg-type]
    engine.add_request(req("p", "plus", key=key._replace(steps=9)))
    for i in range(16):
        engine.add_request(req(f"f{i}", "free", key=key))
    engine.step()
    if slots == 1:
        executor.complete(executor.only().batch_id)
        engine.step()
    assert [len(b.requests) for b in executor.submitted][:2] == [1, first_free_batch]
