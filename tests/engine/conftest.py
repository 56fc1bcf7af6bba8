"""A fake clock and a fake executor: the engine is tested without processes, sleeps or torch."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from kiln.engine import BatchKey, EngineConfig, EngineCore, EngineRequest
from kiln.executor.base import (
    BatchCancelled,
    BatchCompleted,
    BatchFailed,
    BatchProgress,
    ExecBatch,
    ExecutorOutput,
    WorkerLost,
)

KEY = BatchKey("fake", "generate", 64, 64, 4, 7.5)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeExecutor:
    """Records batches; the test decides when each progresses, completes, fails or dies."""

    slots: int = 1
    submitted: list[ExecBatch] = field(default_factory=list)
    running: dict[str, ExecBatch] = field(default_factory=dict)
    cancels: list[str] = field(default_factory=list)
    outputs: list[ExecutorOutput] = field(default_factory=list)

    def free_slots(self) -> int:
        return self.slots - len(self.running)

    def total_slots(self) -> int:
        return self.slots

    def submit(self, batch: ExecBatch) -> None:
        assert self.free_slots() > 0
        self.submitted.append(batch)
        self.running[batch.batch_id] = batch

    def cancel(self, batch_id: str) -> None:
        self.cancels.append(batch_id)

    def poll(self) -> list[ExecutorOutput]:
        outputs, self.outputs = self.outputs, []
        return outputs

    def set_notify(self, notify: Callable[[], None] | None) -> None:
        pass

    # ---- test controls

    def only(self) -> ExecBatch:
        assert len(self.running) == 1, self.running
        return next(iter(self.running.values()))

    def progress(self, batch_id: str, step: int, total: int = 4) -> None:
        self.outputs.append(BatchProgress(batch_id, step, total, {}))

    def complete(self, batch_id: str, duration_s: float = 1.0, fit_images: int | None = None) -> None:
        batch = self.running.pop(batch_id)
        images = {r.request_id: tuple(f"{r.request_id}:{i}".encode() for i in range(r.n)) for r in batch.requests}
        self.outputs.append(BatchCompleted(batch_id, images, duration_s, fit_images))

    def fail(self, batch_id: str, code: str = "generation_failed") -> None:
        self.running.pop(batch_id)
        self.outputs.append(BatchFailed(batch_id, code, "boom"))

    def stopped(self, batch_id: str) -> None:
        self.running.pop(batch_id)
        self.outputs.append(BatchCancelled(batch_id))

    def lose(self, batch_id: str) -> None:
        self.running.pop(batch_id)
        self.outputs.append(WorkerLost(batch_id, "w0", -9))


_ids = itertools.count(1)


def req(
    user: str = "u1",
    plan: str = "free",
    *,
    weight: int | None = None,
    key: BatchKey = KEY,
    prompt: str | None = None,
    seed: int | None = None,
    n: int = 1,
    job_id: str | None = None,
    **kwargs: object,
) -> EngineRequest:
    number = next(_ids)
    weights = {"free": 1, "plus": 4, "enterprise": 8}
    targets = {"free": 120.0, "plus": 30.0, "enterprise": 15.0}
    return EngineRequest(
        job_id=job_id or f"job-{number}",
        user_id=user,
        plan=plan,
        key=key,
        prompt=prompt if prompt is not None else f"prompt {number}",
        seed=seed if seed is not None else number,
        n=n,
        weight=weight if weight is not None else weights.get(plan, 1),
        wait_target_s=targets.get(plan, 60.0),
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def executor() -> FakeExecutor:
    return FakeExecutor()


@pytest.fixture
def make_engine(clock: FakeClock, executor: FakeExecutor) -> Callable[..., EngineCore]:
    def make(**config: object) -> EngineCore:
        config.setdefault("max_batch_wait_s", 0.0)
        config.setdefault("preemption", "off")
        config.setdefault("bound_gap_s", 0.0)  # bound whatever the workers' gap (its own test says when not)
        return EngineCore(executor, EngineConfig(**config), clock=clock)  # type: ignore[arg-type]

    return make


def job_ids(batch: ExecBatch) -> list[str]:
    return [r.request_id for r in batch.requests]


def run_all(engine: EngineCore, executor: FakeExecutor, clock: FakeClock, limit: int = 10_000) -> list[ExecBatch]:
    """Step, completing every batch as it starts, until the engine is empty; batches in run order."""
    order: list[ExecBatch] = []
    for _ in range(limit):
        engine.step()
        if not executor.running:
            if not engine.has_work():
                return order
            clock.advance(0.01)
            continue
        for batch_id, batch in list(executor.running.items()):
            order.append(batch)
            clock.advance(0.1)
            executor.complete(batch_id, duration_s=0.1)
    raise AssertionError("engine did not drain")
