"""Worker capacity (what the thermal guard lowers for a hot GPU): admission's estimate follows a
factor at once — free work degrades then is refused while enterprise work stays within its target —
and a slot below full capacity rests between batches for its share of the time (fake clock)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kiln.engine import Position
from kiln.engine.capacity import Capacity
from kiln.errors import Overloaded

from .conftest import KEY, FakeExecutor, req

UNIT = KEY.units_per_image()


@dataclass
class GatedExecutor(FakeExecutor):
    """The fake executor with LocalExecutor's gate: slot order, a resting slot takes no batch."""

    gate: Capacity | None = None

    def __post_init__(self) -> None:
        self.slot_of: dict[str, int] = {}

    def set_slot_gate(self, gate: Capacity | None) -> None:
        self.gate = gate

    def _open(self) -> list[int]:
        busy = set(self.slot_of[b] for b in self.running)
        return [s for s in range(self.slots) if s not in busy and (self.gate is None or self.gate.may_start(s))]

    def free_slots(self) -> int:
        return len(self._open())

    def submit(self, batch) -> None:  # type: ignore[no-untyped-def]
        self.slot_of[batch.batch_id] = self._open()[0]
        super().submit(batch)

    def finish(self, batch_id: str, busy_s: float) -> None:
        slot = self.slot_of[batch_id]
        self.complete(batch_id, duration_s=busy_s)
        if self.gate is not None:
            self.gate.ran(slot, busy_s)


def test_a_lower_factor_raises_the_estimate_and_every_queued_eta_at_once(make_engine, clock) -> None:
    engine = make_engine(throughput_prior_units_per_s=UNIT)  # one image per second per worker
    engine.executor.free_slots = lambda: 0  # the one worker is busy: the queue stays as it is
    for i in range(10):
        engine.add_request(req(f"f{i}", "free", job_id=f"q{i}"))
    engine.step()
    assert engine.admit(req("late", "free")).expected_wait_s == pytest.approx(10.0)
    assert engine.eta_s("q9") == pytest.approx(9.0)
    engine.set_capacity(0, 0.5)
    assert engine.admit(req("late", "free")).expected_wait_s == pytest.approx(20.0)
    assert engine.eta_s("q9") == pytest.approx(18.0)
    told = {e.job_id: e.eta_s for e in engine.step() if isinstance(e, Position)}
    assert len(told) == 10 and told["q9"] == pytest.approx(18.0)  # followers hear their new wait
    engine.set_capacity(0, 1.0)
    assert engine.admit(req("late", "free")).expected_wait_s == pytest.approx(10.0)


def test_hot_capacity_degrades_then_refuses_free_work_while_enterprise_keeps_its_target(make_engine) -> None:
    engine = make_engine(throughput_prior_units_per_s=UNIT, refuse_at_target_x=2.0)
    for i in range(80):  # 80 s of free work: within free's 120 s target
        engine.add_request(req(f"f{i}", "free"))
    assert engine.admit(req("me", "free", key=KEY._replace(steps=8))).degraded is None
    engine.capacity.set_factor(0, 0.6)  # ≈133 s: over the target, under twice it → degraded
    admitted = engine.admit(req("me", "free", key=KEY._replace(steps=8)))
    assert admitted.degraded is not None and admitted.request.key.steps == 4
    engine.capacity.set_factor(0, 0.25)  # 320 s → refused, Retry-After from the same estimate
    with pytest.raises(Overloaded) as refused:
        engine.admit(req("me", "free"))
    assert refused.value.retry_after_s == pytest.approx(80.0)
    paid = engine.admit(req("boss", "enterprise"))  # sees 1/8 of free's backlog per unit of its own
    assert paid.degraded is None and paid.expected_wait_s <= 15.0


def test_two_workers_one_hot_count_as_one_and_a_half(make_engine, clock) -> None:
    executor = GatedExecutor(slots=2)
    from kiln.engine import EngineConfig, EngineCore

    engine = EngineCore(executor, EngineConfig(max_batch_wait_s=0.0, preemption="off",  # type: ignore[arg-type]
                                               throughput_prior_units_per_s=UNIT), clock=clock)
    for i in range(12):
        engine.add_request(req(f"f{i}", "free", key=KEY._replace(width=128)))
    before = engine.admit(req("late", "free")).expected_wait_s
    engine.capacity.set_factor(1, 0.5)
    assert engine.capacity.effective_slots(2) == pytest.approx(1.5)
    assert engine.admit(req("late", "free")).expected_wait_s == pytest.approx(before * 2 / 1.5)
    assert engine.capacity.effective_slots(1) == pytest.approx(1.0)  # a slot beyond the fleet is not counted


def test_a_hot_slot_rests_for_its_share_and_the_cool_one_takes_the_work(clock) -> None:
    from kiln.engine import EngineConfig, EngineCore

    executor = GatedExecutor(slots=2)
    engine = EngineCore(executor, EngineConfig(max_batch_wait_s=0.0, preemption="off", max_batch_images=1),  # type: ignore[arg-type]
                        clock=clock)
    engine.capacity.set_factor(0, 0.25)  # GPU 0 is hot: busy a quarter of the time
    for i in range(4):
        engine.add_request(req(f"u{i}", "free"))
    engine.step()
    assert sorted(executor.slot_of[b] for b in executor.running) == [0, 1]
    hot = next(b for b in executor.running if executor.slot_of[b] == 0)
    clock.advance(2.0)
    executor.finish(hot, busy_s=2.0)  # ran 2 s at a quarter share: rests 6 s
    engine.step()
    assert [executor.slot_of[b] for b in executor.running] == [1]  # slot 0 took nothing
    assert engine.next_wake_at == pytest.approx(clock.now + 6.0)  # the driver wakes when it may start
    clock.advance(5.9)
    engine.step()
    assert [executor.slot_of[b] for b in executor.running] == [1]
    clock.advance(0.2)
    engine.step()
    assert sorted(executor.slot_of[b] for b in executor.running) == [0, 1]
    # cooled: factor 1 ends any rest at once
    hot = next(b for b in executor.running if executor.slot_of[b] == 0)
    executor.finish(hot, busy_s=1.0)
    engine.capacity.set_factor(0, 1.0)
    engine.step()
    assert sorted(executor.slot_of[b] for b in executor.running) == [0, 1]


def test_factors_are_clamped_and_full_capacity_never_rests(clock) -> None:
    capacity = Capacity(clock)
    capacity.set_factor(0, 0.0)
    assert capacity.factor(0) == pytest.approx(0.05)  # a hot GPU still finishes work
    capacity.ran(1, 10.0)  # slot 1 is at full capacity
    assert capacity.may_start(1) and capacity.next_open_at() is None
    capacity.set_factor(0, 3.0)
    assert capacity.factors() == {}
