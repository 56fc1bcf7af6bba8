"""LocalExecutor's slot gate (the engine's Capacity): a worker below full capacity rests after its
batch for its share of the time, and takes work again at once when its capacity is given back."""

from __future__ import annotations

import time

from kiln.engine.capacity import Capacity
from kiln.executor.base import BatchCompleted

from .conftest import batch, collect


def test_a_worker_below_full_capacity_rests_after_its_batch(local_executor) -> None:
    capacity = Capacity(time.monotonic)
    local_executor.set_slot_gate(capacity)
    try:
        capacity.set_factor(0, 0.05)  # hot: runs a twentieth of the time
        assert local_executor.free_slots() == 1
        local_executor.submit(batch("hot-1", "a warm picture"))
        ended = time.monotonic()
        collect(local_executor, lambda o: isinstance(o, BatchCompleted))
        assert local_executor.free_slots() == 0  # resting: ~19× the batch's time
        rest_until = capacity.next_open_at()
        assert rest_until is not None and rest_until - ended >= 19 * 4 * 0.02
        capacity.set_factor(0, 1.0)  # cool again: no more rest
        assert local_executor.free_slots() == 1
        local_executor.submit(batch("cool-1", "a cool picture"))
        collect(local_executor, lambda o: isinstance(o, BatchCompleted))
        assert local_executor.free_slots() == 1 and capacity.next_open_at() is None
    finally:
        local_executor.set_slot_gate(None)
