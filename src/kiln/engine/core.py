"""EngineCore: one `step()` = schedule → execute → update, as in vLLM's engine core.

It owns the queues, the running batches and every job's fate; it never blocks, never touches the
database, HTTP or torch. An async driver (`kiln.engine.loop`) calls `step()` and routes its events.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from kiln.engine.admission import AdmissionPolicy, Throughput
from kiln.engine.batches import RunningBatch, SchedulerOutput, running_units
from kiln.engine.capacity import Capacity
from kiln.engine.config import EngineConfig
from kiln.engine.forming import BatchFormer
from kiln.engine.jobs import JobBook
from kiln.engine.limits import BatchLimits
from kiln.engine.metrics import EngineMetrics
from kiln.engine.positions import Positions
from kiln.engine.queues import WorkQueues
from kiln.engine.sharing import Sharing
from kiln.engine.types import Admitted, Cancelled, EngineEvent, EngineRequest, Failed, Queued, Started
from kiln.engine.update import Updater
from kiln.engine.work import WorkItem
from kiln.errors import Overloaded
from kiln.executor.base import Executor


class EngineCore:
    """Not thread-safe: one owner (the async driver, or a test) calls every method."""

    def __init__(
        self,
        executor: Executor,
        config: EngineConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.executor = executor
        self.config = config or EngineConfig()
        self.clock = clock
        self.metrics = metrics
        self._queues = WorkQueues()
        self.queue = self._queues.normal
        self.relax_queue = self._queues.relax
        self.stats = self._queues.stats
        self.throughput = Throughput(self.config.throughput_prior_units_per_s, self.config.throughput_alpha)
        self.admission = AdmissionPolicy(self.config, self.throughput)
        self.limits = BatchLimits()
        """Per batch key, the most images that fit in one call (learned from out-of-memory splits)."""
        self.capacity = Capacity(clock)
        """Per worker slot, its share of time (the thermal guard lowers a hot GPU's); admission counts it."""
        if hasattr(executor, "set_slot_gate"):  # an executor that can rest a slot between batches
            executor.set_slot_gate(self.capacity)
        self.running: dict[str, RunningBatch] = {}
        self.plan_caps: dict[str, int] = dict(self.config.plan_max_running_images)
        self._sharing = Sharing()
        self._jobs = JobBook(self.config.finished_memory, self._sharing)
        self._positions = Positions(
            self._queues,
            self.running,
            self.admission,
            self._workers,
            interval_s=self.config.position_interval_s,
            metrics=metrics,
        )
        self._former = BatchFormer(
            self.config, self._queues, self.limits, self.plan_caps, self.running, self.throughput, self._workers
        )
        self._updater = Updater(
            self.config,
            clock,
            running=self.running,
            jobs=self._jobs,
            queues=self._queues,
            positions=self._positions,
            former=self._former,
            limits=self.limits,
            throughput=self.throughput,
            workers=self._workers,
            metrics=metrics,
        )
        self._held = 0
        self._serial = itertools.count(1)

    @property
    def next_wake_at(self) -> float | None:
        """Clock time at which a held partial batch is due; the driver steps again by then."""
        due = [t for t in (self._former.next_wake_at, self.capacity.next_open_at()) if t is not None]
        return min(due, default=None)

    # ---- the public API

    def admit(self, request: EngineRequest) -> Admitted:
        """Accept (maybe degraded) or raise Overloaded; changes nothing, so it is safe to call first."""
        self._learn_plan(request)
        try:
            admitted = self.admission.admit(self.stats, request, self._running_units(), self._workers())
        except Overloaded:
            if self.metrics:
                self.metrics.refused(request.plan, "overloaded")
            raise
        if admitted.degraded and self.metrics:
            self.metrics.degraded(request.plan)
        return admitted

    def hold(self, request: EngineRequest) -> None:
        """Count an admitted request as queued work before it is added, so admissions racing in
        while its job is being created see it; `unhold` it once it is added (or was not created)."""
        self.stats.add(request.plan, request.user_id, request.units, request.relax)
        self._held += 1

    def unhold(self, request: EngineRequest) -> None:
        self.stats.remove(request.plan, request.user_id, request.units, request.relax)
        self._held = max(0, self._held - 1)

    def position_guess(self, request: EngineRequest) -> int:
        """Cheap: about how many queued jobs would run before `request` if it joined now."""
        return self._positions.guess(request, self._held)

    def add_request(self, request: EngineRequest) -> bool:
        """Queue a job; False (and nothing happens) if this job id is already known or finished."""
        if self._jobs.knows(request.job_id):
            return False
        self._learn_plan(request)
        now = self.clock()
        if not request.relax:  # relax arrivals never make other work yield
            self._former.arrived(request.plan, now)
        if request.attempts >= self.config.max_attempts:
            self._jobs.emit(Failed(request.job_id, "too_many_attempts", "the job was started too many times"))
            self._jobs.finish(request.job_id)
            return True
        item = self._sharing.shareable(request, self.queue.weights)
        if item is not None:
            item.members.append(request)
            self._jobs.item_of[request.job_id] = item
            self._emit_queued(request, item)
            if item.batch_id is not None:
                batch = self.running[item.batch_id]
                self._jobs.emit(Started(request.job_id, item.attempts, item.batch_id, batch.images))
            return True
        item = WorkItem(
            work_id=request.job_id,
            leader=request,
            members=[request],
            enqueued_at=now,
            attempts=request.attempts,
            seq=next(self._serial),
        )
        self._jobs.item_of[request.job_id] = item
        self._sharing.add(item)
        self._emit_queued(request, item)
        self._queues.push(item)
        return True

    def cancel(self, job_id: str, user_id: str | None = None) -> bool:
        """Cancel one job: queued, it never runs; running, its batch stops at the next step unless
        other jobs still need it. Another user's job is never touched (False)."""
        item = self._jobs.item_of.get(job_id)
        if item is None:
            return False
        member = next(m for m in item.members if m.job_id == job_id)
        if user_id is not None and member.user_id != user_id:
            return False
        item.members.remove(member)
        del self._jobs.item_of[job_id]
        self._positions.forget(job_id)
        self._jobs.emit(Cancelled(job_id))
        self._jobs.finish(job_id)
        if item.batch_id is None:
            if not item.members:
                self._queues.remove(item)
                self._sharing.forget(item)
            elif item.leader is member:  # re-home under the next owner's plan and user
                self._queues.remove(item)
                item.leader = item.members[0]
                self._queues.push(item)
        else:
            batch = self.running[item.batch_id]
            if not any(i.members for i in batch.items) and not batch.cancelling:
                batch.cancelling = True
                self.executor.cancel(batch.batch_id)
        return True

    def update_plan(
        self,
        plan: str,
        *,
        weight: float | None = None,
        max_running_images: int | None = None,
    ) -> None:
        """Operators change plans live; the next scheduling decision uses the new values."""
        if weight is not None:
            self._queues.set_weight(plan, weight)
        if max_running_images is not None:
            self.plan_caps[plan] = max_running_images

    def set_capacity(self, slot: int, factor: float) -> None:
        """A worker slot's share of time (the thermal guard's); admissions use it at once and every
        queued job hears its new ETA at the next step."""
        before = self.capacity.factor(slot)
        self.capacity.set_factor(slot, factor)
        if self.capacity.factor(slot) != before:
            self._positions.retell()

    def queue_position(self, job_id: str) -> int | None:
        """Queued jobs ahead of this one (0: it runs next); 0 once running, None if unknown."""
        item = self._jobs.item_of.get(job_id)
        if item is None:
            return None
        if item.batch_id is not None:
            return 0
        return self._positions.index_of(item)

    def eta_s(self, job_id: str) -> float | None:
        """Expected seconds until this job starts (0 once running), from measured throughput."""
        item = self._jobs.item_of.get(job_id)
        if item is None:
            return None
        if item.batch_id is not None:
            return 0.0
        return self._positions.wait_s(item)

    def has_work(self) -> bool:
        return bool(self.running or len(self.queue) or len(self.relax_queue))

    def step(self) -> list[EngineEvent]:
        """Schedule → execute → update; returns the events since the last step, in order."""
        scheduled = self._schedule()
        self._execute(scheduled)
        self._updater.update(self.executor.poll())
        self._positions.emit_changed(self.clock(), self._jobs.emit)
        return self._jobs.drain()

    # ---- schedule

    def _schedule(self) -> SchedulerOutput:
        now = self.clock()
        out = SchedulerOutput()
        self._former.next_wake_at = None
        free = self.executor.free_slots()
        while free > 0:
            items = self._former.form(now)
            if items is None:
                break
            out.batches.append(self._start_batch(items, now))
            free -= 1
        if free == 0 and self.config.preemption in ("preempt", "both"):
            victim = self._former.choose_victim()
            if victim is not None:
                out.preempt.append(victim)
        return out

    def _start_batch(self, items: list[WorkItem], now: float) -> RunningBatch:
        for item in list(items):
            for twin in self._sharing.absorb(item):
                self._queues.remove(twin)
            for member in item.members:
                self._jobs.item_of[member.job_id] = item
        weights = self.queue.weights
        batch = RunningBatch(
            batch_id=f"batch-{next(self._serial)}",
            items=items,
            started_at=now,
            best_weight=max(i.weight(weights) for i in items),
            total=items[0].key.steps,
        )
        self.running[batch.batch_id] = batch
        for item in items:
            item.batch_id = batch.batch_id
            item.attempts += 1
            self.stats.remove(item.plan, item.user, item.units, item.relax)
            self._former.started(item)
            if self.metrics:
                self.metrics.dispatched(item.plan, now - item.enqueued_at)
            for member in item.members:
                self._positions.forget(member.job_id)
                self._jobs.emit(Started(member.job_id, item.attempts, batch.batch_id, batch.images))
        return batch

    # ---- execute

    def _execute(self, scheduled: SchedulerOutput) -> None:
        for batch in scheduled.batches:
            self.executor.submit(batch.to_exec())
            if self.metrics:
                self.metrics.batch_started(batch.images)
        for batch in scheduled.preempt:
            batch.preempting = True
            for item in batch.items:
                item.preemptions += 1
            self.executor.cancel(batch.batch_id)

    # ---- bookkeeping

    def _emit_queued(self, request: EngineRequest, item: WorkItem) -> None:
        guess, wait_s = self._positions.queued_guess(item, self._held)
        self._jobs.emit(Queued(request.job_id, guess, wait_s))

    def _learn_plan(self, request: EngineRequest) -> None:
        if self.queue.weights.get(request.plan) != request.weight:
            self.update_plan(request.plan, weight=request.weight)

    def _workers(self) -> float:
        """Workers as admission counts them: each live one at its capacity factor."""
        return self.capacity.effective_slots(self.executor.total_slots())

    def _running_units(self) -> float:
        return running_units(self.running.values())
