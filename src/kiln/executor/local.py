"""LocalExecutor: N worker processes on this machine (spawned, one batch each, each pinned to its own
GPU where there are GPUs), results over pipes.

A reader thread turns pipe messages and process deaths into outputs; a worker that dies (kill -9,
a segfaulting kernel) is reported as WorkerLost for its batch and replaced at once. Deciding what
to re-run is the engine's job, not this module's.
"""

from __future__ import annotations

import logging
import socket
import multiprocessing
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from kiln.executor.base import ExecBatch, ExecutorOutput, ModelLoad, OutputQueue, SlotGate, WorkerLost
from kiln.executor.messages import (
    BATCH_ENDS,
    CancelBatch,
    FromWorker,
    ModelLoaded,
    RunBatch,
    Stop,
    ToWorker,
    WorkerReady,
)
from kiln.executor.worker_main import worker_main
from kiln.worker.registry import ModelInfo, ModelRegistry

log = logging.getLogger(__name__)

MAX_STARTUP_FAILURES = 5
"""A worker slot that dies this many times in a row before it is ready is left down (logged)."""


@dataclass
class _Worker:
    worker_id: str
    process: Any
    inbox: Connection  # parent → child
    outbox: Connection  # child → parent
    gpu: str | None = None
    """The GPU it was pinned to (what its CUDA_VISIBLE_DEVICES was set to), None on CPU."""
    batch_id: str | None = None
    batch_since: float = 0.0
    ready: bool = False
    down: bool = False
    gpus_seen: str | None = None
    """The CUDA_VISIBLE_DEVICES the worker itself reported when ready."""
    loads: dict[str, ModelLoad] = field(default_factory=dict)
    """Models it loaded, by name (what /metrics reports per worker)."""


class LocalExecutor(OutputQueue):
    """Worker processes sharing nothing but pipes with this one. Thread-safe; never blocks in poll."""

    def __init__(
        self,
        models: dict[str, ModelInfo],
        aliases: dict[str, str],
        default: str,
        *,
        workers: int = 1,
        torch_threads: int = 1,
        gpus: list[str | None] | None = None,
    ) -> None:
        """`gpus`: the GPU each worker slot is pinned to (`kiln.executor.gpus.worker_gpus`); None
        pins none (every worker sees what this process sees)."""
        self._models = models
        self._aliases = aliases
        self._default = default
        self._gpus = list(gpus) if gpus is not None else [None] * workers
        workers = len(self._gpus)
        self._size = workers
        self._torch_threads = torch_threads
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._outputs: list[ExecutorOutput] = []
        self._workers: list[_Worker] = []
        self._generation = 0
        self._notify: Callable[[], None] | None = None
        self._gate: SlotGate | None = None
        self._stopping = False
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        self._reader: threading.Thread | None = None
        self._startup_failures = [0] * workers
        self.restarts = 0

    @classmethod
    def from_registry(
        cls, registry: ModelRegistry, *, workers: int = 1, torch_threads: int = 1,
        gpus: list[str | None] | None = None,
    ) -> LocalExecutor:
        models = {name: registry.info(name) for name in registry.names}
        return cls(models, registry.aliases, registry.default, workers=workers, torch_threads=torch_threads,
                   gpus=gpus)

    @classmethod
    def from_settings(cls, settings: Any) -> LocalExecutor:
        """`workers` (a number or `auto`: one per GPU) over `gpu_devices` (None: every visible GPU)."""
        from kiln.executor.gpus import visible_gpus, worker_gpus

        registry = ModelRegistry.from_settings(settings)
        devices = settings.gpu_devices if settings.gpu_devices is not None else visible_gpus()
        gpus = worker_gpus(settings.workers, devices)
        return cls.from_registry(registry, torch_threads=settings.torch_threads, gpus=gpus)

    # ---- lifecycle

    def start(self) -> None:
        with self._lock:
            self._workers = [self._spawn(i) for i in range(self._size)]
        self._reader = threading.Thread(target=self._read_loop, name="kiln-executor-reader", daemon=True)
        self._reader.start()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            workers = list(self._workers)
        for worker in workers:
            if not worker.ready:  # still importing: nothing to finish, no reason to wait
                worker.process.kill()
                continue
            try:
                worker.inbox.send(Stop())
            except OSError:
                pass
        for worker in workers:
            worker.process.join(timeout_s)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout_s)
        self._wake()
        if self._reader is not None:
            self._reader.join(timeout_s)

    def _spawn(self, slot: int) -> _Worker:
        self._generation += 1
        worker_id = f"local-{slot}.{self._generation}"
        child_in, parent_in = self._ctx.Pipe(duplex=False)
        parent_out, child_out = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=worker_main,
            args=(worker_id, child_in, child_out, self._models, self._aliases, self._default, self._torch_threads,
                  self._gpus[slot]),
            name=f"kiln-worker-{worker_id}",
            daemon=True,
        )
        process.start()
        child_in.close()
        child_out.close()
        return _Worker(worker_id, process, parent_in, parent_out, gpu=self._gpus[slot])

    # ---- the Executor interface

    def total_slots(self) -> int:
        with self._lock:
            return sum(1 for w in self._workers if not w.down)

    def free_slots(self) -> int:
        with self._lock:
            return sum(1 for slot, w in enumerate(self._workers) if self._open(slot, w))

    def submit(self, batch: ExecBatch) -> None:
        with self._lock:
            worker = next((w for slot, w in enumerate(self._workers) if self._open(slot, w)), None)
            if worker is None:
                raise RuntimeError("no idle worker: check free_slots() before submit()")
            worker.batch_id, worker.batch_since = batch.batch_id, time.monotonic()
        self._send(worker, RunBatch(batch))  # outside the lock: the reader thread must never wait on a pipe

    def cancel(self, batch_id: str) -> None:
        with self._lock:
            worker = next((w for w in self._workers if w.batch_id == batch_id), None)
        if worker is not None:
            self._send(worker, CancelBatch(batch_id))

    def _send(self, worker: _Worker, message: ToWorker) -> None:
        try:
            worker.inbox.send(message)
        except OSError:
            pass  # the worker is dead; the reader sees its sentinel and reports the batch lost

    def set_slot_gate(self, gate: SlotGate | None) -> None:
        """Ask `gate` before giving a slot a batch, and tell it how long each batch kept its slot."""
        self._gate = gate

    def _open(self, slot: int, worker: _Worker) -> bool:
        idle = worker.ready and worker.batch_id is None and not worker.down
        return idle and (self._gate is None or self._gate.may_start(slot))

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until every live worker has loaded its model (True) or the timeout passes."""
        with self._changed:
            return self._changed.wait_for(lambda: all(w.ready for w in self._workers if not w.down), timeout_s)

    # ---- for tests and operators

    def worker_pid(self, batch_id: str) -> int | None:
        with self._lock:
            for worker in self._workers:
                if worker.batch_id == batch_id:
                    return worker.process.pid
        return None

    def worker_pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._workers]

    def worker_gpus(self) -> list[str | None]:
        """The GPUs the ready workers reported they were given (their CUDA_VISIBLE_DEVICES), by slot."""
        with self._lock:
            return [w.gpus_seen for w in self._workers if w.ready and not w.down]

    def ready_slots(self) -> int:
        """Live workers that have loaded their models (idle or busy)."""
        with self._lock:
            return sum(1 for w in self._workers if w.ready and not w.down)

    def worker_nodes(self) -> list[str]:
        """The machine of each live worker, in slot order: this host's name for every one."""
        with self._lock:
            return [socket.gethostname() for w in self._workers if not w.down]

    def model_loads(self) -> list[ModelLoad]:
        """What each live worker loaded: load seconds and memory (read by /metrics at scrape time)."""
        with self._lock:
            return [load for w in self._workers if not w.down for load in w.loads.values()]

    # ---- the reader thread

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"")
        except OSError:
            pass

    def _read_loop(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                workers = [w for w in self._workers if not w.down]
            by_handle: dict[Any, tuple[_Worker, str]] = {}
            for worker in workers:
                by_handle[worker.outbox] = (worker, "pipe")
                by_handle[worker.process.sentinel] = (worker, "exit")
            ready = wait([*by_handle, self._wake_r], timeout=1.0)
            for handle in ready:
                if handle is self._wake_r:
                    self._drain_wake()
                    continue
                worker, what = by_handle[handle]
                if what == "pipe":
                    self._read_pipe(worker)
                else:
                    self._on_exit(worker)

    def _drain_wake(self) -> None:
        while self._wake_r.poll():
            self._wake_r.recv()

    def _read_pipe(self, worker: _Worker) -> None:
        try:
            while worker.outbox.poll():
                self._on_message(worker, worker.outbox.recv())
        except (EOFError, OSError):
            pass  # dead: the sentinel reports it

    def _on_message(self, worker: _Worker, message: FromWorker) -> None:
        if isinstance(message, WorkerReady):  # only now is it a slot: a send to a loading worker could block
            with self._lock:
                worker.ready = True
                worker.gpus_seen = message.gpus
                worker.loads.update({load.model: load for load in message.loads})
                self._changed.notify_all()
            self._notify_driver()
            return
        if isinstance(message, ModelLoaded):
            with self._lock:
                worker.loads[message.load.model] = message.load
            return
        if not isinstance(message, ExecutorOutput):
            log.warning("worker %s sent %r; ignored", worker.worker_id, type(message).__name__)
            return
        with self._lock:
            if isinstance(message, BATCH_ENDS) and worker.batch_id == message.batch_id:
                worker.batch_id = None  # free before the engine sees the output
                if self._gate is not None and worker in self._workers:
                    self._gate.ran(self._workers.index(worker), time.monotonic() - worker.batch_since)
            self._outputs.append(message)
            self._changed.notify_all()
        self._notify_driver()

    def _on_exit(self, worker: _Worker) -> None:
        self._read_pipe(worker)  # whatever it sent before dying still counts
        worker.process.join(0.1)
        with self._lock:
            if worker not in self._workers:
                return
            lost = worker.batch_id
            slot = self._workers.index(worker)
            failures = self._startup_failures[slot] = 0 if worker.ready else self._startup_failures[slot] + 1
            if self._stopping:
                pass
            elif failures >= MAX_STARTUP_FAILURES:  # it cannot even start: stop burning a core on it
                log.error("worker slot %d died %d times before it was ready; leaving it down", slot, failures)
                worker.down = True
                worker.batch_id = None
            else:
                self._workers[slot] = self._spawn(slot)
                self.restarts += 1
            if lost is not None:
                self._outputs.append(WorkerLost(lost, worker.worker_id, worker.process.exitcode))
                self._changed.notify_all()
        for conn in (worker.inbox, worker.outbox):
            conn.close()
        if lost is not None:
            self._notify_driver()

    def _notify_driver(self) -> None:
        notify = self._notify
        if notify is not None:
            notify()

