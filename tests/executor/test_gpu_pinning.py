"""A worker per GPU: `workers = "auto"` starts one worker process per GPU, each seeing only its own
(its CUDA_VISIBLE_DEVICES, set before torch starts), and a replacement keeps its slot's GPU. There is
no GPU here: the GPUs are named through `gpu_devices`, and the test reads what each worker was given."""

from __future__ import annotations

import os
import signal
import time

from kiln.config import ModelSpec, load_settings
from kiln.executor.base import BatchCompleted, BatchProgress, WorkerLost
from kiln.executor.gpus import visible_gpus, worker_gpus
from kiln.executor.local import LocalExecutor

from .conftest import batch, collect


def test_visible_gpus_follow_cuda_visible_devices() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-8d0e, GPU-77aa"}) == ["GPU-8d0e", "GPU-77aa"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []


def test_auto_is_one_worker_per_gpu_and_one_without_gpus() -> None:
    assert worker_gpus("auto", ["0", "1", "2"]) == ["0", "1", "2"]
    assert worker_gpus("auto", []) == [None]
    assert worker_gpus(3, ["0", "1"]) == ["0", "1", "0"]  # more workers than GPUs take them in turn
    assert worker_gpus(2, []) == [None, None]


def test_each_worker_sees_only_its_own_gpu_and_a_replacement_keeps_it(tmp_path) -> None:
    settings = load_settings(
        models={"fake": ModelSpec(path=tmp_path, loader="kiln.testing:load_fake_pipeline",
                                  options={"step_s": 0.02})},
        default_model="fake", model_aliases={}, torch_threads=1, workers="auto", gpu_devices=["0", "1"],
    )
    executor = LocalExecutor.from_settings(settings)
    executor.start()
    try:
        assert executor.wait_ready(timeout_s=60)
        assert executor.total_slots() == 2
        assert sorted(executor.worker_gpus()) == ["0", "1"]

        executor.submit(batch("doomed", "slow", steps=500))
        collect(executor, lambda o: isinstance(o, BatchProgress))
        pid = executor.worker_pid("doomed")
        os.kill(pid, signal.SIGKILL)
        collect(executor, lambda o: isinstance(o, WorkerLost))
        assert pid not in executor.worker_pids()
        deadline = time.monotonic() + 60
        while len(executor.worker_gpus()) < 2 and time.monotonic() < deadline:  # the replacement loads
            executor.wait_ready(timeout_s=1)
        assert sorted(executor.worker_gpus()) == ["0", "1"]  # the replacement is pinned as its slot was
        executor.submit(batch("after", "fine"))
        assert isinstance(collect(executor, lambda o: isinstance(o, BatchCompleted))[-1], BatchCompleted)
    finally:
        executor.shutdown()
