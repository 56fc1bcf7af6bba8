"""The body of one worker process: load the registry, run batches sent down a pipe, report back.

Runs only in a spawned child; this is where torch gets imported (through `run_batch`), never in
the parent. Cancel arrives on the same pipe and is read between denoising steps. Messages both ways
are the dataclasses of `kiln.executor.messages`.
"""

from __future__ import annotations

import time
from collections import deque
from multiprocessing.connection import Connection

from kiln.executor.base import (
    BatchCancelled,
    BatchCompleted,
    BatchFailed,
    BatchProgress,
    BatchStarted,
    ExecBatch,
    ModelLoad,
)
from kiln.executor.messages import CancelBatch, ModelLoaded, RunBatch, Stop, ToWorker, WorkerReady
from kiln.worker.registry import ModelInfo, ModelRegistry
from kiln.worker.requests import BatchSpec


def worker_main(
    worker_id: str,
    inbox: Connection,
    outbox: Connection,
    models: dict[str, ModelInfo],
    aliases: dict[str, str],
    default: str,
    torch_threads: int,
) -> None:
    import torch

    torch.set_num_threads(torch_threads)
    worker = _Worker(worker_id, ModelRegistry(models, aliases, default), inbox, outbox)
    loads: tuple[ModelLoad, ...] = ()
    try:  # load the default model now, so a restarted worker is warm before its first batch
        loads = (worker.load(default),)
    except Exception:  # noqa: BLE001 - a model that cannot load fails its batches, with the reason
        pass
    outbox.send(WorkerReady(worker_id, loads))
    while True:
        try:
            message = worker.pending.popleft() if worker.pending else inbox.recv()
        except (EOFError, OSError):
            return
        if isinstance(message, Stop):
            return
        if isinstance(message, RunBatch):
            worker.run(message.batch)
        # a CancelBatch for a batch that already finished is stale: drop it


class _Worker:
    """One process's worker: its registry, its pipes, and what it learned about memory."""

    def __init__(
        self, worker_id: str, registry: ModelRegistry, inbox: Connection, outbox: Connection
    ) -> None:
        self.worker_id = worker_id
        self.registry = registry
        self.inbox = inbox
        self.outbox = outbox
        self.pending: deque[ToWorker] = deque()
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

    def run(self, batch: ExecBatch) -> None:
        from kiln.worker.requests import StepProgress
        from kiln.worker.requests import Pixels
        from kiln.worker.runner import Cancelled, run_batch

        batch_id = batch.batch_id
        cancelled = False
        fit: int | None = None

        def should_cancel() -> bool:
            nonlocal cancelled
            while self.inbox.poll():
                message = self.inbox.recv()
                if isinstance(message, CancelBatch):
                    cancelled = cancelled or message.batch_id == batch_id
                else:
                    self.pending.append(message)
            return cancelled

        def on_progress(progress: StepProgress) -> None:
            self.outbox.send(BatchProgress(batch_id, progress.step, progress.total, progress.previews))

        def on_fit(images: int) -> None:
            nonlocal fit
            fit = images
            self.fits[batch.spec] = min(images, self.fits.get(batch.spec, images))

        self.outbox.send(BatchStarted(batch_id, self.worker_id))
        try:
            if self.registry.info(batch.spec.model).name not in self.loaded:
                self.outbox.send(ModelLoaded(self.load(batch.spec.model)))
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
            self.outbox.send(BatchCancelled(batch_id))
            return
        except Exception as exc:  # noqa: BLE001 - every pipeline failure is reported, the worker lives on
            self.outbox.send(BatchFailed(batch_id, _failure_code(exc), f"{type(exc).__name__}: {exc}"[:500]))
            _release_memory()
            return
        duration_s = time.perf_counter() - started
        pixels = {rid: tuple(Pixels.of(image) for image in imgs) for rid, imgs in images.items()}
        self.outbox.send(BatchCompleted(batch_id, pixels, duration_s, fit))


def _failure_code(exc: BaseException) -> str:
    from kiln.worker.oom import is_oom

    return "out_of_memory" if is_oom(exc) else "generation_failed"


def _release_memory() -> None:
    from kiln.worker.oom import release_memory

    release_memory()
