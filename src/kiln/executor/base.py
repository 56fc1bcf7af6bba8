"""The executor interface: submit a batch, receive outputs, cancel. One batch per worker at a time.

The engine calls `submit`/`cancel` and drains `poll()` once per step; an executor must never block
in those. Outputs for one batch arrive in order: BatchStarted, BatchProgress*, then exactly one of
BatchCompleted · BatchFailed · BatchCancelled · WorkerLost.

`LocalExecutor` (worker processes, `kiln.executor.local`) and `RayExecutor` (an actor per GPU of a
Ray cluster, `kiln.executor.ray_executor`) both fit this shape and run a batch through the same
`kiln.executor.batch_runner`; a dead process, actor or node is WorkerLost for its batch.
"""

from __future__ import annotations

import threading

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kiln.worker.requests import BatchSpec, GenerationRequest


@dataclass(frozen=True)
class ExecBatch:
    """One pipeline call: what the requests share, and the requests (request_id is the engine's)."""

    batch_id: str
    spec: BatchSpec
    requests: tuple[GenerationRequest, ...]
    preview_every: int = 0


@dataclass(frozen=True)
class ExecutorOutput:
    batch_id: str


@dataclass(frozen=True)
class BatchStarted(ExecutorOutput):
    worker_id: str


@dataclass(frozen=True)
class BatchProgress(ExecutorOutput):
    step: int
    total: int
    previews: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchCompleted(ExecutorOutput):
    images: dict[str, tuple[Any, ...]]
    """Per request id, its images as `kiln.worker.requests.Pixels` (raw, encoded once when stored)."""
    """PNG bytes per request id."""
    duration_s: float
    """Wall time of the pipeline call on the worker (what throughput is measured from)."""
    fit_images: int | None = None
    """Set when the worker ran out of GPU memory and split the batch: the most images one pipeline
    call managed. The engine caps later batches of this key there."""


@dataclass(frozen=True)
class BatchFailed(ExecutorOutput):
    code: str
    """out_of_memory · generation_failed"""
    message: str


@dataclass(frozen=True)
class BatchCancelled(ExecutorOutput):
    """The worker stopped between steps because `cancel` asked it to."""


@dataclass(frozen=True)
class WorkerLost(ExecutorOutput):
    worker_id: str
    exitcode: int | None


@dataclass(frozen=True)
class ModelLoad:
    """A model a worker loaded: how long it took and the worker's memory right after (allocated
    CUDA memory on a GPU, the process's resident set on CPU)."""

    worker_id: str
    model: str
    device: str
    load_s: float
    memory_bytes: int


class SlotGate(Protocol):
    """What an executor that can rest a worker between batches asks (`set_slot_gate`); the engine's
    `Capacity` is one. Slot i is the i-th worker (GPU i unless mapped otherwise)."""

    def may_start(self, slot: int) -> bool: ...

    def ran(self, slot: int, busy_s: float) -> None:
        """A batch on `slot` ended after `busy_s` seconds on it."""
        ...



class OutputQueue:
    """What an executor has to say, queued for the engine: `poll` drains it, `wait_outputs` blocks
    for it, `set_notify` names who to wake. The executor owns `_lock`, the `_changed` condition on it,
    `_outputs` and `_notify`, and appends to `_outputs` under the lock (notifying `_changed`)."""

    _lock: threading.Lock
    _changed: threading.Condition
    _outputs: list[ExecutorOutput]
    _notify: Callable[[], None] | None

    def poll(self) -> list[ExecutorOutput]:
        with self._lock:
            outputs, self._outputs = self._outputs, []
        return outputs

    def wait_outputs(self, timeout_s: float) -> list[ExecutorOutput]:
        """Block until there is at least one output (or the timeout), then drain them."""
        with self._changed:
            self._changed.wait_for(lambda: bool(self._outputs), timeout_s)
            outputs, self._outputs = self._outputs, []
        return outputs

    def set_notify(self, notify: Callable[[], None] | None) -> None:
        self._notify = notify


class Executor(Protocol):
    """What the engine needs from a pool of workers (local processes or Ray actors)."""

    def free_slots(self) -> int:
        """Batches that could start now (idle live workers)."""
        ...

    def total_slots(self) -> int:
        """Workers configured, idle or not (throughput is per worker times this)."""
        ...

    def submit(self, batch: ExecBatch) -> None: ...

    def cancel(self, batch_id: str) -> None:
        """Ask the batch to stop at the next step boundary; it then reports BatchCancelled."""
        ...

    def poll(self) -> list[ExecutorOutput]:
        """Everything that happened since the last call; never blocks."""
        ...

    def set_notify(self, notify: Callable[[], None] | None) -> None:
        """Called (from any thread) when new outputs are ready, so a driver can wake up."""
        ...
