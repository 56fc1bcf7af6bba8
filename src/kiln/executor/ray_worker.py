"""The body of one Ray worker actor: a loaded registry on one GPU (Ray sets its CUDA_VISIBLE_DEVICES),
running one batch at a time through `BatchRunner`, exactly as a local worker process does.

`run` is a streaming generator: each output is yielded as it happens (BatchStarted, ModelLoaded?,
BatchProgress*, then one of BatchCompleted · BatchFailed · BatchCancelled). The actor is threaded, so
`cancel` and `ready` are answered while a batch runs; the batch reads the cancel between steps.
This module never imports ray: `kiln.executor.ray_executor` wraps the class with `ray.remote`.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from kiln.executor.base import BatchFailed, ExecBatch, ModelLoad
from kiln.executor.batch_runner import BatchRunner, visible_devices
from kiln.executor.messages import BATCH_ENDS, FromWorker
from kiln.worker.registry import ModelInfo, ModelRegistry

MAX_CONCURRENCY = 4
"""Threads of a worker actor: the batch's stream, plus room for `cancel`, `ready` and `pid`."""


@dataclass(frozen=True)
class ActorReady:
    """A (re)started actor has loaded its default model and takes batches now."""

    worker_id: str
    pid: int
    gpus: str | None
    """Its CUDA_VISIBLE_DEVICES, as Ray set it (None on a CPU actor)."""
    loads: tuple[ModelLoad, ...] = ()


class WorkerActor:
    """One worker on a Ray node. Ray re-runs the constructor when it restarts the actor's process."""

    def __init__(
        self, worker_id: str, models: dict[str, ModelInfo], aliases: dict[str, str], default: str,
        torch_threads: int,
    ) -> None:
        import torch

        torch.set_num_threads(torch_threads)
        self._worker_id = worker_id
        self._outputs: queue.SimpleQueue[FromWorker] = queue.SimpleQueue()
        self._runner = BatchRunner(worker_id, ModelRegistry(models, aliases, default), self._outputs.put)
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._loads = self._runner.load_default()

    def ready(self) -> ActorReady:
        return ActorReady(self._worker_id, os.getpid(), visible_devices(), self._loads)

    def pid(self) -> int:
        return os.getpid()

    def cancel(self, batch_id: str) -> None:
        with self._lock:
            self._cancelled.add(batch_id)

    def run(self, batch: ExecBatch) -> Iterator[FromWorker]:
        """Stream the batch's outputs back as they happen (the runner reports from its own thread,
        since the pipeline calls back rather than yields)."""
        batch_id = batch.batch_id

        def should_cancel() -> bool:
            with self._lock:
                return batch_id in self._cancelled

        def body() -> None:
            try:
                self._runner.run(batch, should_cancel)
            except BaseException as exc:  # noqa: BLE001 - the stream must end with an outcome
                self._outputs.put(BatchFailed(batch_id, "generation_failed", f"{type(exc).__name__}: {exc}"[:500]))

        thread = threading.Thread(target=body, name=f"kiln-batch-{batch_id}", daemon=True)
        thread.start()
        try:
            while True:
                message = self._outputs.get()
                yield message
                if isinstance(message, BATCH_ENDS) and message.batch_id == batch_id:
                    return
        finally:
            thread.join()
            with self._lock:
                self._cancelled.discard(batch_id)
