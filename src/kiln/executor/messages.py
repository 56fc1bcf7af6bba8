"""What crosses the pipes between LocalExecutor and a worker process: small frozen dataclasses, one
per meaning, dispatched on type at each end (never tuples whose meaning lives in an `if` chain).

Down the pipe: RunBatch · CancelBatch · Stop. Up: WorkerReady once, ModelLoaded when a batch loads
another model, and for each batch the executor's own outputs (BatchStarted, BatchProgress*, then one
of BatchCompleted · BatchFailed · BatchCancelled), which the parent passes on to the engine as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.executor.base import (
    BatchCancelled,
    BatchCompleted,
    BatchFailed,
    BatchProgress,
    BatchStarted,
    ExecBatch,
    ModelLoad,
)


@dataclass(frozen=True)
class RunBatch:
    batch: ExecBatch


@dataclass(frozen=True)
class CancelBatch:
    """Stop this batch at its next step; stale (dropped) once that batch has finished."""

    batch_id: str


@dataclass(frozen=True)
class Stop:
    """Finish nothing more and exit."""


@dataclass(frozen=True)
class WorkerReady:
    """The worker has loaded what it loads at start (the default model) and takes batches now."""

    worker_id: str
    loads: tuple[ModelLoad, ...] = ()
    gpus: str | None = None
    """The GPUs the worker was given (its CUDA_VISIBLE_DEVICES; None: unrestricted, as on CPU)."""


@dataclass(frozen=True)
class ModelLoaded:
    """A batch for another model loaded it (it stays loaded)."""

    load: ModelLoad


ToWorker = RunBatch | CancelBatch | Stop
BatchOutput = BatchStarted | BatchProgress | BatchCompleted | BatchFailed | BatchCancelled
FromWorker = WorkerReady | ModelLoaded | BatchOutput
BATCH_ENDS = (BatchCompleted, BatchFailed, BatchCancelled)
"""A worker is free again once it sent one of these for its batch."""
