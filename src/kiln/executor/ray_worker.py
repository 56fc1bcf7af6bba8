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
        self._runner = BatchRunner(worker_id, ModelRegistry(models, aliases, default), _unsent)
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._one_batch = threading.Lock()
        """Batches never overlap: one the executor gave up on (its stream broke) finishes or stops
        at its cancel before the next starts."""
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
        outputs: queue.SimpleQueue[FromWorker] = queue.SimpleQueue()

        def should_cancel() -> bool:
            with self._lock:
                return batch_id in self._cancelled

        def body() -> None:
            with self._one_batch:
                self._runner.send = outputs.put
                try:
                    self._runner.run(batch, should_cancel)
                except BaseException as exc:  # noqa: BLE001 - the stream must end with an outcome
                    outputs.put(BatchFailed(batch_id, "generation_failed", f"{type(exc).__name__}: {exc}"[:500]))
                finally:
                    self._runner.send = _unsent

        thread = threading.Thread(target=body, name=f"kiln-batch-{batch_id}", daemon=True)
        thread.start()
        ended = False
        try:
            while not ended:
                message = outputs.get()
                ended = isinstance(message, BATCH_ENDS) and message.batch_id == batch_id
                yield message
        finally:
            if not ended:  # the caller went away: stop at the next step rather than draw for no one
                self.cancel(batch_id)
            thread.join()
            with self._lock:
                self._cancelled.discard(batch_id)


def _unsent(_message: FromWorker) -> None:
    """Where a runner reports between batches: nowhere (nothing runs then)."""
