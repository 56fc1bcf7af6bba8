"""The engine over real worker processes: kill -9 mid-batch, a poison request, a raising pipeline."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter

import pytest
import pytest_asyncio
from engine.recorder import EventRecorder

from kiln.engine import (
    AsyncEngine,
    BatchKey,
    Cancelled,
    Completed,
    EngineConfig,
    EngineCore,
    EngineRequest,
    Failed,
    Progress,
)

from .conftest import make_executor

KEY = BatchKey("fake", "generate", 32, 32, 40, 7.5)


def request(job_id: str, prompt: str, user: str = "u") -> EngineRequest:
    return EngineRequest(job_id=job_id, user_id=user, plan="plus", key=KEY, prompt=prompt, seed=1, weight=4)


pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def recorder() -> EventRecorder:
    return EventRecorder()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(recorder):
    """One engine over two workers for the module: spawning workers is the slow part."""
    executor = make_executor(workers=2)
    engine = AsyncEngine(EngineCore(executor, EngineConfig(max_batch_wait_s=0.0)), idle_poll_s=1.0)
    engine.add_listener(recorder)
    outcomes: list = []
    engine.add_listener(lambda e: outcomes.append(e) if isinstance(e, (Completed, Failed)) else None)
    engine.outcomes = outcomes  # type: ignore[attr-defined]
    await engine.start()
    yield engine
    await engine.stop()
    await asyncio.to_thread(executor.shutdown)


async def outcomes_of(recorder: EventRecorder, job_ids: list[str]) -> dict[str, object]:
    results = await asyncio.gather(*(recorder.wait(j, timeout_s=90) for j in job_ids))
    return dict(zip(job_ids, results, strict=True))


async def test_kill_9_mid_batch_reruns_every_request_exactly_once(engine, recorder):
    jobs = [request(f"k{i}", f"picture {i}", user=f"u{i}") for i in range(3)]
    for job in jobs:
        engine.add_request(job)
    async for event in recorder.stream("k0"):
        if isinstance(event, Progress):
            break
    (batch_id,) = engine.core.running
    assert len(engine.core.running[batch_id].items) == 3
    os.kill(engine.core.executor.worker_pid(batch_id), signal.SIGKILL)
    results = await outcomes_of(recorder, [j.job_id for j in jobs])
    assert all(isinstance(r, Completed) and len(r.images) == 1 for r in results.values()), results
    assert Counter(e.job_id for e in engine.outcomes if e.job_id in results) == {j.job_id: 1 for j in jobs}
    assert engine.core.executor.restarts >= 1


async def test_poison_request_fails_after_killing_its_worker_three_times(engine, recorder):
    jobs = [request("p0", "[[crash]] poison"), request("p1", "fine one", "v"), request("p2", "fine two", "w")]
    restarts = engine.core.executor.restarts
    for job in jobs:
        engine.add_request(job)
    results = await outcomes_of(recorder, [j.job_id for j in jobs])
    poison = results["p0"]
    assert isinstance(poison, Failed) and poison.code == "worker_crashed"
    assert isinstance(results["p1"], Completed) and isinstance(results["p2"], Completed)
    assert engine.core.executor.restarts - restarts == 3
    assert Counter(e.job_id for e in engine.outcomes if e.job_id in results) == {"p0": 1, "p1": 1, "p2": 1}


async def test_raising_pipeline_fails_the_bad_request_with_a_code(engine, recorder):
    jobs = [request("f0", "[[fail]] bad"), request("f1", "good", "v"), request("f2", "[[oom]] big", "w")]
    for job in jobs:
        engine.add_request(job)
    results = await outcomes_of(recorder, [j.job_id for j in jobs])
    assert isinstance(results["f0"], Failed) and results["f0"].code == "generation_failed"
    assert isinstance(results["f2"], Failed) and results["f2"].code == "out_of_memory"
    assert isinstance(results["f1"], Completed)


async def test_cancel_stops_a_running_job_and_the_worker_takes_the_next(engine, recorder):
    slow = EngineRequest(job_id="c0", user_id="u", plan="plus", key=KEY._replace(steps=2000), prompt="slow",
                         seed=1, weight=4)
    engine.add_request(slow)
    async for event in recorder.stream("c0"):
        if isinstance(event, Progress):
            break
    assert engine.cancel("c0", "u")
    assert isinstance(await recorder.wait("c0", timeout_s=30), Cancelled)
    engine.add_request(request("c1", "next"))
    assert isinstance(await recorder.wait("c1", timeout_s=60), Completed)
    assert await asyncio.to_thread(engine.core.executor.wait_ready, 60)
    assert not engine.core.running and engine.core.executor.free_slots() == 2
