"""The update step: what the executor reported, applied to running batches and their jobs —
progress, completion, failure (isolating shared batches), cancellation, preemption, lost workers.
It never starts work; requeued items go back to the front of their queue for the next schedule.
"""

from __future__ import annotations

from collections.abc import Callable

from kiln.engine.admission import Throughput
from kiln.engine.batches import RunningBatch
from kiln.engine.config import EngineConfig
from kiln.engine.forming import BatchFormer
from kiln.engine.jobs import JobBook
from kiln.engine.limits import BatchLimits
from kiln.engine.metrics import EngineMetrics
from kiln.engine.positions import Positions
from kiln.engine.queues import WorkQueues
from kiln.engine.types import Completed, Failed, Progress, Requeued
from kiln.engine.work import WorkItem
from kiln.executor.base import (
    BatchCancelled,
    BatchCompleted,
    BatchFailed,
    BatchProgress,
    ExecutorOutput,
    WorkerLost,
)


class Updater:
    """Owns no state of its own: every change lands in the collaborators it was given."""

    def __init__(
        self,
        config: EngineConfig,
        clock: Callable[[], float],
        *,
        running: dict[str, RunningBatch],
        jobs: JobBook,
        queues: WorkQueues,
        positions: Positions,
        former: BatchFormer,
        limits: BatchLimits,
        throughput: Throughput,
        workers: Callable[[], float],
        metrics: EngineMetrics | None,
    ) -> None:
        self.config = config
        self.clock = clock
        self._running = running
        self._jobs = jobs
        self._queues = queues
        self._positions = positions
        self._former = former
        self._limits = limits
        self._throughput = throughput
        self._workers = workers
        self._metrics = metrics

    def update(self, outputs: list[ExecutorOutput]) -> None:
        for output in outputs:
            batch = self._running.get(output.batch_id)
            if batch is None:
                continue
            if isinstance(output, BatchProgress):
                self._on_progress(batch, output)
            elif isinstance(output, BatchCompleted):
                self._on_completed(batch, output)
            elif isinstance(output, BatchFailed):
                self._on_failed(batch, output)
            elif isinstance(output, BatchCancelled):
                self._on_cancelled(batch)
            elif isinstance(output, WorkerLost):
                self._on_worker_lost(batch, output)

    def _on_progress(self, batch: RunningBatch, output: BatchProgress) -> None:
        batch.step, batch.total = output.step, output.total
        for item in batch.items:
            preview = output.previews.get(item.work_id)
            for member in item.members:
                self._jobs.emit(Progress(member.job_id, output.step, output.total, preview))

    def _on_completed(self, batch: RunningBatch, output: BatchCompleted) -> None:
        self._end_batch(batch)
        self._limits.learn(batch.items[0].key, output.fit_images)
        self._throughput.observe(batch.units, batch.images, output.duration_s)
        if self._metrics:
            self._metrics.batch_finished(batch.images, output.duration_s, batch.units_by_plan())
            self._metrics.throughput(self._throughput.images_per_s * self._workers())
        for item in batch.items:
            images = tuple(output.images.get(item.work_id, ()))
            for member in item.members:
                self._jobs.emit(Completed(member.job_id, images, shared_with=len(item.members) - 1))
            self._jobs.close(item)

    def _on_failed(self, batch: RunningBatch, output: BatchFailed) -> None:
        self._end_batch(batch)
        shared = len(batch.items) > 1
        for item in batch.items:
            if not item.members:
                self._jobs.close(item)
            elif shared:  # run each alone once, so only the bad request fails
                item.isolate = True
                self._requeue(item, "isolating")
            else:
                self._fail(item, output.code, output.message)

    def _on_cancelled(self, batch: RunningBatch) -> None:
        self._end_batch(batch)
        for item in batch.items:
            if item.members:  # preempted, or someone joined after the cancel was sent
                self._requeue(item, "preempted")
            else:
                self._jobs.close(item)

    def _on_worker_lost(self, batch: RunningBatch, output: WorkerLost) -> None:
        self._end_batch(batch)
        for item in batch.items:
            if not item.members:
                self._jobs.close(item)
                continue
            item.crashes += 1
            if item.crashes >= self.config.max_worker_crashes:
                self._fail(
                    item,
                    "worker_crashed",
                    f"the worker died {item.crashes} times running this request (exit code {output.exitcode})",
                )
                continue
            item.isolate = True  # from now on it runs alone, so a next death is its own
            self._requeue(item, "worker_lost")

    def _end_batch(self, batch: RunningBatch) -> None:
        self._running.pop(batch.batch_id, None)
        if self._metrics:
            self._metrics.gpu_seconds(batch.units_by_plan(), self.clock() - batch.started_at)
        for item in batch.items:
            item.batch_id = None
            self._former.ended(item)

    def _requeue(self, item: WorkItem, reason: str) -> None:
        if item.attempts >= self.config.max_attempts:
            self._fail(item, "too_many_attempts", f"the request was started {item.attempts} times")
            return
        for member in item.members:
            self._jobs.emit(Requeued(member.job_id, reason))
        self._queues.push(item, front=True)
        self._positions.force()
        self._queues.refund(item)  # a preempted or lost batch is not paid for twice

    def _fail(self, item: WorkItem, code: str, message: str) -> None:
        for member in item.members:
            self._jobs.emit(Failed(member.job_id, code, message))
        self._jobs.close(item)
