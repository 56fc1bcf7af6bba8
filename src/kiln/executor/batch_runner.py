"""One worker's batches, whatever carries them: a local worker process (pipes) and a Ray actor (a
streaming generator) both run a batch through `BatchRunner`, so a batch runs the same on either.

It reports through the `send` it is given and asks the `should_cancel` it is given between steps;
it never decides what runs next. Runs only where the pipeline lives (torch is imported lazily).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from kiln.executor.base import (
    BatchCancelled,
    BatchCompleted,
    BatchFailed,
    BatchProgress,
    BatchStarted,
    ExecBatch,
    ModelLoad,
)
from kiln.executor.messages import FromWorker, ModelLoaded
from kiln.worker.registry import ModelRegistry
from kiln.worker.requests import BatchSpec

Send = Callable[[FromWorker], None]

CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"


def pin_to_gpu(device: str | None) -> None:
    """Make only `device` (an index or UUID) visible to this process. Must run before torch starts
    CUDA: the worker's `cuda` is then device 0 of what it sees, its own GPU."""
    if device is not None:
        os.environ[CUDA_VISIBLE_DEVICES] = device


def visible_devices() -> str | None:
    """The GPUs this process may use, as its environment names them (None: not restricted)."""
    return os.environ.get(CUDA_VISIBLE_DEVICES)


class BatchRunner:
    """A worker's registry and what it learned about memory; runs one batch at a time."""

    def __init__(self, worker_id: str, registry: ModelRegistry, send: Send) -> None:
        self.worker_id = worker_id
        self.registry = registry
        self.send = send
        self.loaded: set[str] = set()
        self.fits: dict[BatchSpec, int] = {}
        """Most images one call managed per batch spec after running out of memory: later batches
        of that spec start at that size instead of running out again first."""

    def load(self, name: str) -> ModelLoad:
        from kiln.worker import placement

        started = time.perf_counter()
        self.registry.pipeline(name)
        device = placement.worker_device()
        load = ModelLoad(self.worker_id, self.registry.info(name).name, device, time.perf_counter() - started,
                         placement.memory_bytes(device))
        self.loaded.add(load.model)
        return load

    def load_default(self) -> tuple[ModelLoad, ...]:
        """Load the default model now, so a (re)started worker is warm before its first batch."""
        try:
            return (self.load(self.registry.default),)
        except Exception:  # noqa: BLE001 - a model that cannot load fails its batches, with the reason
            return ()

    def run(self, batch: ExecBatch, should_cancel: Callable[[], bool]) -> None:
        """Run the batch, sending BatchStarted, ModelLoaded?, BatchProgress*, then exactly one of
        BatchCompleted · BatchFailed · BatchCancelled."""
        from kiln.worker.requests import Pixels, StepProgress
        from kiln.worker.runner import Cancelled, run_batch

        batch_id = batch.batch_id
        fit: int | None = None

        def on_progress(progress: StepProgress) -> None:
            self.send(BatchProgress(batch_id, progress.step, progress.total, progress.previews))

        def on_fit(images: int) -> None:
            nonlocal fit
            fit = images
            self.fits[batch.spec] = min(images, self.fits.get(batch.spec, images))

        self.send(BatchStarted(batch_id, self.worker_id))
        try:
            if self.registry.info(batch.spec.model).name not in self.loaded:
                self.send(ModelLoaded(self.load(batch.spec.model)))
            started = time.perf_counter()
            images = run_batch(
                self.registry,
                batch.spec,
                batch.requests,
                on_progress=on_progress,
                should_cancel=should_cancel,
                preview_every=batch.preview_every,
                max_images=self.fits.get(batch.spec),
                on_fit=on_fit,
            )
        except Cancelled:
            self.send(BatchCancelled(batch_id))
            return
        except Exception as exc:  # noqa: BLE001 - every pipeline failure is reported, the worker lives on
            self.send(BatchFailed(batch_id, _failure_code(exc), f"{type(exc).__name__}: {exc}"[:500]))
            _release_memory()
            return
        duration_s = time.perf_counter() - started
        pixels = {rid: tuple(Pixels.of(image) for image in imgs) for rid, imgs in images.items()}
        self.send(BatchCompleted(batch_id, pixels, duration_s, fit))


def _failure_code(exc: BaseException) -> str:
    from kiln.worker.oom import is_oom

    return "out_of_memory" if is_oom(exc) else "generation_failed"


def _release_memory() -> None:
    from kiln.worker.oom import release_memory

    release_memory()
