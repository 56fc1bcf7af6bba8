"""Real worker processes running the FakePipeline (spawned, so these tests cost a few seconds)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from kiln.executor.base import ExecBatch, ExecutorOutput
from kiln.executor.local import LocalExecutor
from kiln.worker.registry import ModelInfo
from kiln.worker.requests import BatchSpec, GenerationRequest

STEP_S = 0.02


def fake_model(crash_once_dir: str = "", oom_above: int = 0) -> dict[str, ModelInfo]:
    info = ModelInfo(
        name="fake",
        path=".",
        native_size=64,
        steps=4,
        guidance_scale=7.5,
        dtype="float32",
        loader="kiln.testing:load_fake_pipeline",
        options=(("crash_once_dir", crash_once_dir), ("oom_above", oom_above), ("step_s", STEP_S)),
    )
    return {"fake": info}


def make_executor(workers: int = 1, oom_above: int = 0) -> LocalExecutor:
    executor = LocalExecutor(fake_model(oom_above=oom_above), {}, "fake", workers=workers, torch_threads=1)
    executor.start()
    assert executor.wait_ready(timeout_s=60)
    return executor


@pytest.fixture(scope="package")
def local_executor() -> Iterator[LocalExecutor]:
    executor = make_executor(workers=1)
    yield executor
    executor.shutdown()


def batch(batch_id: str, *prompts: str, steps: int = 4, n: int = 1) -> ExecBatch:
    spec = BatchSpec("fake", 32, 32, steps, 7.5)
    requests = tuple(GenerationRequest(f"{batch_id}-r{i}", p, seed=i, n=n) for i, p in enumerate(prompts))
    return ExecBatch(batch_id, spec, requests)


def collect(
    executor: LocalExecutor, until: Callable[[ExecutorOutput], bool], timeout_s: float = 60.0
) -> list[ExecutorOutput]:
    """Outputs up to and including the first that `until` accepts (waits on the executor, no sleeps)."""
    seen: list[ExecutorOutput] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for output in executor.wait_outputs(timeout_s=deadline - time.monotonic()):
            seen.append(output)
            if until(output):
                return seen
    raise AssertionError(f"timed out; saw {seen}")
