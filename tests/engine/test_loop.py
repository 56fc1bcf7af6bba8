"""The async driver: steps on its own, routes events to listeners in order."""

from __future__ import annotations

import asyncio

from kiln.engine import AsyncEngine, Cancelled, Completed, EngineConfig, EngineCore, Failed, Queued, Started
from kiln.executor.base import BatchCompleted, BatchFailed

from .conftest import FakeExecutor, req
from .recorder import EventRecorder


class AutoExecutor(FakeExecutor):
    """Completes each batch as soon as it is submitted (fails prompts containing 'bad')."""

    def set_notify(self, notify):
        self.notify = notify

    def submit(self, batch):
        super().submit(batch)
        self.running.pop(batch.batch_id)
        if any("bad" in r.prompt for r in batch.requests):
            self.outputs.append(BatchFailed(batch.batch_id, "generation_failed", "boom"))
        else:
            images = {r.request_id: (b"png",) * r.n for r in batch.requests}
            self.outputs.append(BatchCompleted(batch.batch_id, images, 0.01))
        self.notify()


async def test_driver_runs_jobs_and_routes_events():
    executor = AutoExecutor(slots=1)
    engine = AsyncEngine(EngineCore(executor, EngineConfig(max_batch_wait_s=0.01)), idle_poll_s=5.0)
    seen = []
    engine.add_listener(seen.append)
    recorder = EventRecorder()
    engine.add_listener(recorder)
    written = []

    async def write(event):
        written.append(event)

    engine.add_listener(write)
    await engine.start()
    try:
        good, bad = req("a", n=2), req("b", prompt="bad one")
        assert engine.add_request(good) and engine.add_request(bad)
        assert not engine.add_request(good)
        done = await recorder.wait(good.job_id, timeout_s=10)
        failed = await recorder.wait(bad.job_id, timeout_s=10)
        assert isinstance(done, Completed) and done.images == (b"png", b"png")
        assert isinstance(failed, Failed) and failed.code == "generation_failed"
        stream = [type(e) for e in recorder.events(good.job_id)]
        assert stream[0] is Queued and Started in stream and stream[-1] is Completed
        while len(written) < len(seen):
            await asyncio.sleep(0)
        assert [type(e) for e in written] == [type(e) for e in seen]
    finally:
        await engine.stop()


async def test_cancel_through_the_driver():
    executor = FakeExecutor(slots=0)  # nothing ever starts
    engine = AsyncEngine(EngineCore(executor, EngineConfig()), idle_poll_s=5.0)
    recorder = EventRecorder()
    engine.add_listener(recorder)
    await engine.start()
    try:
        job = req("a")
        engine.add_request(job)
        assert engine.queue_position(job.job_id) == 0
        assert not engine.cancel(job.job_id, "someone-else")
        assert engine.cancel(job.job_id, "a")
        assert isinstance(await recorder.wait(job.job_id, timeout_s=10), Cancelled)
        assert await recorder.wait("unknown", timeout_s=1) is None
    finally:
        await engine.stop()
