"""LocalExecutor with real worker processes: results, failures with codes, cancel, kill -9."""

from __future__ import annotations

import os
import signal


from kiln.executor.base import (
    BatchCancelled,
    BatchCompleted,
    BatchFailed,
    BatchProgress,
    BatchStarted,
    WorkerLost,
)
from kiln.testing import prompt_colour

from .conftest import batch, collect


def test_batch_completes_with_raw_pixels_per_request(local_executor):
    local_executor.submit(batch("ok", "a fox", "an owl", n=2))
    outputs = collect(local_executor, lambda o: isinstance(o, BatchCompleted))
    assert isinstance(outputs[0], BatchStarted)
    assert [o.step for o in outputs if isinstance(o, BatchProgress)] == [1, 2, 3, 4]
    done = outputs[-1]
    assert set(done.images) == {"ok-r0", "ok-r1"} and all(len(v) == 2 for v in done.images.values())
    image = done.images["ok-r1"][1].image()  # raw pixels: encoded once, when stored
    assert image.size == (32, 32)
    assert image.getpixel((0, 0)) == prompt_colour("an owl", 2)  # request seed 1, second image
    assert done.duration_s > 0 and local_executor.free_slots() == 1


def test_pipeline_errors_are_reported_with_a_code(local_executor):
    local_executor.submit(batch("bad", "a [[fail]] request"))
    failed = collect(local_executor, lambda o: isinstance(o, BatchFailed))[-1]
    assert failed.code == "generation_failed" and "fake pipeline failure" in failed.message
    local_executor.submit(batch("oom", "[[oom]]"))
    failed = collect(local_executor, lambda o: isinstance(o, BatchFailed))[-1]
    assert failed.code == "out_of_memory"


def test_cancel_stops_at_the_next_step(local_executor):
    local_executor.submit(batch("long", "slow", steps=500))
    collect(local_executor, lambda o: isinstance(o, BatchProgress))
    local_executor.cancel("long")
    outputs = collect(local_executor, lambda o: isinstance(o, (BatchCancelled, BatchCompleted)))
    assert isinstance(outputs[-1], BatchCancelled)
    assert max(o.step for o in outputs if isinstance(o, BatchProgress)) < 500
    assert local_executor.free_slots() == 1


def test_kill_9_reports_the_batch_lost_and_restarts_the_worker(local_executor):
    local_executor.submit(batch("doomed", "slow", steps=500))
    collect(local_executor, lambda o: isinstance(o, BatchProgress))
    pid = local_executor.worker_pid("doomed")
    os.kill(pid, signal.SIGKILL)
    lost = collect(local_executor, lambda o: isinstance(o, WorkerLost))[-1]
    assert lost.batch_id == "doomed" and lost.exitcode == -signal.SIGKILL
    assert pid not in local_executor.worker_pids()
    assert local_executor.wait_ready(timeout_s=60)
    local_executor.submit(batch("after", "fine"))
    assert isinstance(collect(local_executor, lambda o: isinstance(o, BatchCompleted))[-1], BatchCompleted)
