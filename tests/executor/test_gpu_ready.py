"""Real worker processes, fake GPU trouble: a batch that runs out of memory is split in the worker and
completes, reporting the most images that fit; each worker reports its model's load time and memory.
(The out-of-memory errors are the fake pipeline's: nothing here ran on a GPU.)"""

from __future__ import annotations

import dataclasses

from kiln.executor.base import BatchCompleted, BatchProgress, ExecBatch
from kiln.executor.local import LocalExecutor
from kiln.worker.requests import BatchSpec, GenerationRequest

from .conftest import batch, collect, fake_model


def test_a_batch_too_big_for_memory_completes_and_workers_report_their_loads() -> None:
    models = fake_model(oom_above=3)
    models["other"] = dataclasses.replace(models["fake"], name="other")
    executor = LocalExecutor(models, {}, "fake", workers=1, torch_threads=1)
    executor.start()
    try:
        assert executor.wait_ready(timeout_s=60)
        [load] = executor.model_loads()
        assert load.model == "fake" and load.device == "cpu"
        assert load.load_s > 0 and load.memory_bytes > 10 * 2**20
        assert load.worker_id in [f"local-0.{i}" for i in range(1, 3)]

        executor.submit(batch("big", *[f"prompt {i}" for i in range(4)], n=2))  # 8 images
        outputs = collect(executor, lambda o: isinstance(o, BatchCompleted))
        done = outputs[-1]
        assert sum(len(v) for v in done.images.values()) == 8
        assert done.fit_images == 2  # 8 and 4 ran out; halves of 2 fit
        steps = [o.step for o in outputs if isinstance(o, BatchProgress)]
        assert steps == sorted(steps) and steps[-1] == 4

        executor.submit(batch("again", *[f"prompt {i}" for i in range(4)], n=2))
        again = collect(executor, lambda o: isinstance(o, BatchCompleted))[-1]
        assert again.fit_images == 2  # the worker remembers the fit and starts there

        other = ExecBatch("other", BatchSpec("other", 32, 32, 2, 7.5), (GenerationRequest("o", "p", seed=1),))
        executor.submit(other)
        collect(executor, lambda o: isinstance(o, BatchCompleted))
        assert sorted(load.model for load in executor.model_loads()) == ["fake", "other"]  # loaded on demand
    finally:
        executor.shutdown()
