"""Batch limits learned from out-of-memory splits: once a worker reports that only N images of a key
fit in one call, later batches of that key are formed at N or fewer; other keys keep the full cap.
LoRA sets are part of the key, so different adapter sets never share a call."""

from __future__ import annotations

from kiln.engine import Completed
from kiln.engine.limits import BatchLimits

from .conftest import KEY, job_ids, req, run_all


def images(batch) -> int:
    return sum(r.n for r in batch.requests)


def test_limits_only_go_down_and_only_for_their_key() -> None:
    limits = BatchLimits()
    limits.learn(KEY, None)
    assert limits.cap(KEY, 8) == 8
    limits.learn(KEY, 4)
    limits.learn(KEY, 6)  # a later, luckier batch does not raise it again
    assert limits.cap(KEY, 8) == 4
    assert limits.cap(KEY, 2) == 2
    assert limits.cap(KEY._replace(width=128), 8) == 8


def test_after_a_split_batch_the_next_batches_of_that_key_are_capped(make_engine, executor, clock) -> None:
    engine = make_engine(max_batch_images=8)
    for i in range(8):
        engine.add_request(req(f"u{i}", plan="enterprise"))
    engine.step()
    first = executor.only()
    assert images(first) == 8
    executor.complete(first.batch_id, fit_images=3)  # the worker split it: 3 was the most that fit
    events = engine.step()
    assert sum(isinstance(e, Completed) for e in events) == 8  # every image of the batch of 8 arrived
    assert engine.limits.cap(KEY, 8) == 3

    other = KEY._replace(width=128)
    for i in range(8):
        engine.add_request(req(f"v{i}", plan="enterprise"))
        engine.add_request(req(f"w{i}", plan="enterprise", key=other))
    sizes: dict[int, list[int]] = {}
    for batch in run_all(engine, executor, clock):
        sizes.setdefault(batch.spec.width, []).append(images(batch))
    assert sizes[KEY.width] == [3, 3, 2]
    assert sizes[other.width] == [8]


def test_a_request_bigger_than_the_learned_cap_still_runs_alone(make_engine, executor, clock) -> None:
    engine = make_engine(max_batch_images=8)
    engine.limits.learn(KEY, 2)
    big, small = req(n=4), req("u2")
    engine.add_request(big)
    engine.add_request(small)
    batches = run_all(engine, executor, clock)
    assert [job_ids(b) for b in batches] == [[big.job_id], [small.job_id]]  # its worker splits it


def test_different_lora_sets_never_share_a_batch(make_engine, executor, clock) -> None:
    engine = make_engine(max_batch_images=8)
    sets = [(), (("style", 1.0),), (("style", 0.5),), (("ink", 1.0), ("style", 1.0))]
    key_of = {}
    for i in range(12):
        r = req(f"u{i}", plan="enterprise", key=KEY._replace(loras=sets[i % len(sets)]))
        key_of[r.job_id] = r.key.loras
        engine.add_request(r)
    batches = run_all(engine, executor, clock)
    assert len(batches) == len(sets)
    for batch in batches:
        assert len({key_of[i] for i in job_ids(batch)}) == 1
        assert batch.spec.loras == key_of[job_ids(batch)[0]]  # the worker is told which adapters to use
