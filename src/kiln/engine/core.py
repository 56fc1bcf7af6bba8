"""EngineCore: one `step()` = schedule → execute → update, as in vLLM's engine core.

It owns the queues, the running batches and every job's fate; it never blocks, never touches the
database, HTTP or torch. An async driver (`kiln.engine.loop`) calls `step()` and routes its events.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable

from kiln.engine.admission import AdmissionPolicy, QueueStats, Throughput
from kiln.engine.batches import RunningBatch, SchedulerOutput
from kiln.engine.config import EngineConfig
from kiln.engine.fairqueue import FairQueue
from kiln.engine.limits import BatchLimits
from kiln.engine.metrics import EngineMetrics
from kiln.engine.types import (
    Admitted,
    Cancelled,
    Completed,
    EngineEvent,
    EngineRequest,
    Failed,
    Position,
    Progress,
    Queued,
    Requeued,
    Started,
)
from kiln.engine.work import WorkItem
from kiln.errors import Overloaded
from kiln.executor.base import (
    BatchCancelled,
    BatchCompleted,
    BatchFailed,
    BatchProgress,
    Executor,
    ExecutorOutput,
    WorkerLost,
)

RELAX_WEIGHT = 0.0


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
        self.queue = FairQueue()
        self.relax_queue = FairQueue()
        self.stats = QueueStats()
        self.throughput = Throughput(self.config.throughput_prior_units_per_s, self.config.throughput_alpha)
        self.admission = AdmissionPolicy(self.config, self.throughput)
        self.limits = BatchLimits()
        """Per batch key, the most images that fit in one call (learned from out-of-memory splits)."""
        self.running: dict[str, RunningBatch] = {}
        self.plan_caps: dict[str, int] = dict(self.config.plan_max_running_images)
        self._item_of: dict[str, WorkItem] = {}
        self._by_identity: dict[tuple[object, ...], list[WorkItem]] = defaultdict(list)
        self._running_images: dict[str, int] = defaultdict(int)
        self._last_arrival: dict[str, float] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._events: list[EngineEvent] = []
        self._held = 0
        self._serial = itertools.count(1)
        self._positions: dict[str, int] = {}
        self._order_cache: list[WorkItem] | None = None
        self._positions_at = float("-inf")
        self._positions_due = False
        self._positions_forced = False
        self._priority_plan: str | None = None
        self.next_wake_at: float | None = None
        """Clock time at which a held partial batch is due; the driver steps again by then."""

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
        ahead = self.stats.units_ahead(request)
        queued = len(self.queue) + self._held + (len(self.relax_queue) if request.relax else 0)
        return min(queued, round(ahead / max(request.units, 1e-9)))

    def add_request(self, request: EngineRequest) -> bool:
        """Queue a job; False (and nothing happens) if this job id is already known or finished."""
        if request.job_id in self._item_of or request.job_id in self._finished:
            return False
        self._learn_plan(request)
        now = self.clock()
        if not request.relax:  # relax arrivals never make other work yield
            self._last_arrival[request.plan] = now
        if request.attempts >= self.config.max_attempts:
            self._emit(Failed(request.job_id, "too_many_attempts", "the job was started too many times"))
            self._finish(request.job_id)
            return True
        item = self._shareable(request)
        if item is not None:
            item.members.append(request)
            self._item_of[request.job_id] = item
            self._emit(Queued(request.job_id, self._position_guess(item), self._eta_guess(request)))
            if item.batch_id is not None:
                self._emit(Started(request.job_id, item.attempts, item.batch_id, self.running[item.batch_id].images))
            return True
        item = WorkItem(
            work_id=request.job_id,
            leader=request,
            members=[request],
            enqueued_at=now,
            attempts=request.attempts,
            seq=next(self._serial),
        )
        self._item_of[request.job_id] = item
        identity = request.identity()
        if identity is not None:
            self._by_identity[identity].append(item)
        self._emit(Queued(request.job_id, self._position_guess(item), self._eta_guess(request)))
        self._enqueue(item)
        return True

    def cancel(self, job_id: str, user_id: str | None = None) -> bool:
        """Cancel one job: queued, it never runs; running, its batch stops at the next step unless
        other jobs still need it. Another user's job is never touched (False)."""
        item = self._item_of.get(job_id)
        if item is None:
            return False
        member = next(m for m in item.members if m.job_id == job_id)
        if user_id is not None and member.user_id != user_id:
            return False
        item.members.remove(member)
        del self._item_of[job_id]
        self._positions.pop(job_id, None)
        self._emit(Cancelled(job_id))
        self._finish(job_id)
        if item.batch_id is None:
            if not item.members:
                self._dequeue(item)
                self._forget_identity(item)
            elif item.leader is member:  # re-home under the next owner's plan and user
                self._dequeue(item)
                item.leader = item.members[0]
                self._enqueue(item)
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
            self.queue.set_weight(plan, weight)
            self.relax_queue.set_weight(plan, weight)
            self.stats.weights[plan] = weight
        if max_running_images is not None:
            self.plan_caps[plan] = max_running_images

    def queue_position(self, job_id: str) -> int | None:
        """Queued jobs ahead of this one (0: it runs next); 0 once running, None if unknown."""
        item = self._item_of.get(job_id)
        if item is None:
            return None
        if item.batch_id is not None:
            return 0
        for index, queued in enumerate(self._order()):
            if queued is item:
                return index
        return None

    def eta_s(self, job_id: str) -> float | None:
        """Expected seconds until this job starts (0 once running), from measured throughput."""
        item = self._item_of.get(job_id)
        if item is None:
            return None
        if item.batch_id is not None:
            return 0.0
        ahead = self._running_units()
        for queued in self._order():
            if queued is item:
                return ahead / self.admission.rate_units_per_s(self._workers())
            ahead += queued.units
        return None

    def has_work(self) -> bool:
        return bool(self.running or len(self.queue) or len(self.relax_queue))

    def step(self) -> list[EngineEvent]:
        """Schedule → execute → update; returns the events since the last step, in order."""
        scheduled = self._schedule()
        self._execute(scheduled)
        self._update(self.executor.poll())
        self._emit_positions()
        events, self._events = self._events, []
        return events

    # ---- schedule

    def _schedule(self) -> SchedulerOutput:
        now = self.clock()
        out = SchedulerOutput()
        self.next_wake_at = None
        free = self.executor.free_slots()
        while free > 0:
            batch = self._form_batch(now)
            if batch is None:
                break
            out.batches.append(batch)
            free -= 1
        if free == 0 and self.config.preemption in ("preempt", "both"):
            victim = self._choose_victim()
            if victim is not None:
                out.preempt.append(victim)
        return out

    def _form_batch(self, now: float) -> RunningBatch | None:
        queue = self.queue
        head = None
        if self._priority_plan is not None:
            head = queue.peek(lambda i: i.plan == self._priority_plan and self._eligible(i))
            self._priority_plan = None
        head = head or queue.peek(self._eligible)
        if head is None:
            queue = self.relax_queue  # idle-only: nothing else can run now
            head = queue.peek(self._eligible)
        if head is None:
            return None
        cap = self.limits.cap(head.key, self.config.max_batch_images)
        top = self._top_weight(now)
        low_cap = self.config.bound_batch_images

        def low(item: WorkItem) -> bool:  # bounded: someone better is waiting or arriving
            return top is not None and self._weight_of(item) < top

        if not head.isolate and self._hold(queue, head, min(cap, low_cap) if low(head) else cap, now):
            return None
        items = [head]
        queue.take(head)
        images = head.images
        low_images = head.images if low(head) else 0
        pending: dict[str, int] = defaultdict(int)
        pending[head.plan] += head.images

        def fits(item: WorkItem) -> bool:
            return (
                item.key == head.key
                and not item.isolate
                and images + item.images <= cap
                and (not low(item) or low_images + item.images <= low_cap)
                and self._eligible(item, pending[item.plan])
            )

        while not head.isolate and images < cap:
            item = queue.peek(fits)
            if item is None:
                break
            queue.take(item)
            items.append(item)
            images += item.images
            low_images += item.images if low(item) else 0
            pending[item.plan] += item.images
        return self._start_batch(items, now)

    def _hold(self, queue: FairQueue, head: WorkItem, cap: int, now: float) -> bool:
        """Keep a partial batch back for more of its key, up to max_batch_wait_s from its oldest."""
        if self.config.max_batch_wait_s <= 0:
            return False
        images, oldest = 0, head.enqueued_at
        for item in queue:
            if item.key == head.key and not item.isolate and self._eligible(item):
                images += item.images
                oldest = min(oldest, item.enqueued_at)
                if images >= cap:
                    return False  # a full batch is there: go
        due = oldest + self.config.max_batch_wait_s
        if now >= due:
            return False
        self.next_wake_at = due
        return True

    def _eligible(self, item: WorkItem, pending: int = 0) -> bool:
        cap = self.plan_caps.get(item.plan)
        if cap is None:
            return True
        running = self._running_images[item.plan] + pending
        return running == 0 or running + item.images <= cap

    def _top_weight(self, now: float) -> float | None:
        """With bounding on: the highest weight queued or arrived within bound_window_s. Work below
        it rides in a batch only up to bound_batch_images, so no batch grows long on its account."""
        if self.config.preemption not in ("bound", "both"):
            return None
        weights = self.queue.weights
        recent = [p for p, t in self._last_arrival.items() if now - t <= self.config.bound_window_s]
        return max((weights.get(p, 1.0) for p in [*self.queue.plans_waiting(), *recent]), default=None)

    def _choose_victim(self) -> RunningBatch | None:
        if any(b.preempting for b in self.running.values()):
            return None
        waiting = self.queue.peek(self._eligible)
        if waiting is None:
            return None
        weight = self._weight_of(waiting)
        victims = [
            b
            for b in self.running.values()
            if b.best_weight < weight
            and not b.cancelling
            and b.progress < self.config.preempt_max_progress
            and all(i.preemptions < self.config.max_preemptions for i in b.items)
        ]
        if not victims:
            return None
        self._priority_plan = waiting.plan  # the freed worker goes to the work that asked for it
        return min(victims, key=lambda b: (b.best_weight, b.progress))

    def _start_batch(self, items: list[WorkItem], now: float) -> RunningBatch:
        for item in list(items):
            self._absorb_identical(item)
        batch = RunningBatch(
            batch_id=f"batch-{next(self._serial)}",
            items=items,
            started_at=now,
            best_weight=max(self._weight_of(i) for i in items),
            total=items[0].key.steps,
        )
        self.running[batch.batch_id] = batch
        for item in items:
            item.batch_id = batch.batch_id
            item.attempts += 1
            self.stats.remove(item.plan, item.user, item.units, item.relax)
            self._running_images[item.plan] += item.images
            self._positions_due = True
            if self.metrics:
                self.metrics.dispatched(item.plan, now - item.enqueued_at)
            for member in item.members:
                self._positions.pop(member.job_id, None)
                self._emit(Started(member.job_id, item.attempts, batch.batch_id, batch.images))
        self._order_cache = None
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

    # ---- update

    def _update(self, outputs: list[ExecutorOutput]) -> None:
        for output in outputs:
            batch = self.running.get(output.batch_id)
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
                self._emit(Progress(member.job_id, output.step, output.total, preview))

    def _on_completed(self, batch: RunningBatch, output: BatchCompleted) -> None:
        self._end_batch(batch)
        self.limits.learn(batch.items[0].key, output.fit_images)
        self.throughput.observe(batch.units, batch.images, output.duration_s)
        if self.metrics:
            self.metrics.batch_finished(batch.images, output.duration_s, self._units_by_plan(batch))
            self.metrics.throughput(self.throughput.images_per_s * self._workers())
        for item in batch.items:
            images = tuple(output.images.get(item.work_id, ()))
            for member in item.members:
                self._emit(Completed(member.job_id, images, shared_with=len(item.members) - 1))
            self._close(item)

    def _on_failed(self, batch: RunningBatch, output: BatchFailed) -> None:
        self._end_batch(batch)
        shared = len(batch.items) > 1
        for item in batch.items:
            if not item.members:
                self._close(item)
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
                self._close(item)

    def _on_worker_lost(self, batch: RunningBatch, output: WorkerLost) -> None:
        self._end_batch(batch)
        for item in batch.items:
            if not item.members:
                self._close(item)
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
        self.running.pop(batch.batch_id, None)
        if self.metrics:
            self.metrics.gpu_seconds(self._units_by_plan(batch), self.clock() - batch.started_at)
        for item in batch.items:
            item.batch_id = None
            self._running_images[item.plan] -= item.images

    def _requeue(self, item: WorkItem, reason: str) -> None:
        if item.attempts >= self.config.max_attempts:
            self._fail(item, "too_many_attempts", f"the request was started {item.attempts} times")
            return
        for member in item.members:
            self._emit(Requeued(member.job_id, reason))
        self._enqueue(item, front=True)
        self._positions_forced = True
        (self.relax_queue if item.relax else self.queue).refund(item)

    def _fail(self, item: WorkItem, code: str, message: str) -> None:
        for member in item.members:
            self._emit(Failed(member.job_id, code, message))
        self._close(item)

    def _close(self, item: WorkItem) -> None:
        for member in item.members:
            self._item_of.pop(member.job_id, None)
            self._finish(member.job_id)
        item.members = []
        self._forget_identity(item)

    # ---- queues, sharing and bookkeeping

    def _enqueue(self, item: WorkItem, *, front: bool = False) -> None:
        (self.relax_queue if item.relax else self.queue).push(item, front=front)
        self.stats.add(item.plan, item.user, item.units, item.relax)
        self._order_cache = None
        self._positions_due = True

    def _dequeue(self, item: WorkItem) -> None:
        if (self.relax_queue if item.relax else self.queue).remove(item):
            self.stats.remove(item.plan, item.user, item.units, item.relax)
            self._order_cache = None
            self._positions_due = True

    def _shareable(self, request: EngineRequest) -> WorkItem | None:
        """A live item drawing exactly these images that this request may join without waiting longer."""
        identity = request.identity()
        if identity is None:
            return None
        for item in self._by_identity.get(identity, ()):
            if not item.members:
                continue
            if item.batch_id is not None:
                return item
            if self._weight_of(item) >= self._weight_of_request(request):
                return item
        return None

    def _absorb_identical(self, item: WorkItem) -> None:
        """Queued twins of an item about to run join it (each owner still gets its own output)."""
        identity = item.leader.identity()
        if identity is None:
            return
        for twin in list(self._by_identity.get(identity, ())):
            if twin is item or twin.batch_id is not None or not twin.members:
                continue
            self._dequeue(twin)
            for member in twin.members:
                item.members.append(member)
                self._item_of[member.job_id] = item
            twin.members = []
            self._forget_identity(twin)

    def _forget_identity(self, item: WorkItem) -> None:
        identity = item.leader.identity()
        if identity is None:
            return
        twins = self._by_identity.get(identity)
        if twins and item in twins:
            twins.remove(item)
            if not twins:
                del self._by_identity[identity]

    def _finish(self, job_id: str) -> None:
        self._finished[job_id] = None
        while len(self._finished) > self.config.finished_memory:
            self._finished.popitem(last=False)

    def _learn_plan(self, request: EngineRequest) -> None:
        if self.queue.weights.get(request.plan) != request.weight:
            self.update_plan(request.plan, weight=request.weight)

    def _weight_of(self, item: WorkItem) -> float:
        return RELAX_WEIGHT if item.relax else self.queue.weights.get(item.plan, 1.0)

    def _weight_of_request(self, request: EngineRequest) -> float:
        return RELAX_WEIGHT if request.relax else float(request.weight)

    def _workers(self) -> int:
        return self.executor.total_slots()

    def _running_units(self) -> float:
        return sum(b.units * (1.0 - b.progress) for b in self.running.values())

    def _units_by_plan(self, batch: RunningBatch) -> dict[str, float]:
        units: dict[str, float] = defaultdict(float)
        for item in batch.items:
            units[item.plan] += item.units
        return units

    def _emit(self, event: EngineEvent) -> None:
        self._events.append(event)

    # ---- positions

    def _order(self) -> list[WorkItem]:
        if self._order_cache is None:
            self._order_cache = self.queue.order() + self.relax_queue.order()
        return self._order_cache

    def _position_guess(self, item: WorkItem) -> int:
        """Cheap, for the Queued event; exact positions follow within position_interval_s."""
        if item.batch_id is not None:
            return 0
        return self.position_guess(item.leader)

    def _eta_guess(self, request: EngineRequest) -> float:
        return self.admission.expected_wait_s(self.stats, request, self._running_units(), self._workers())

    def _emit_positions(self) -> None:
        """Position events for jobs whose place changed, when work left the queue or every interval."""
        now = self.clock()
        if not (self._positions_due or self._positions_forced):
            return
        if not self._positions_forced and now - self._positions_at < self.config.position_interval_s:
            return  # a busy queue moves every dispatch; tell people about it once an interval
        self._positions_due = self._positions_forced = False
        self._positions_at = now
        ahead = self._running_units()
        rate = self.admission.rate_units_per_s(self._workers())
        for index, item in enumerate(self._order()):
            for member in item.members:
                if _moved(self._positions.get(member.job_id), index):
                    self._positions[member.job_id] = index
                    self._emit(Position(member.job_id, index, ahead / rate))
            ahead += item.units
        if self.metrics:
            self.metrics.queue_depths(self._depths())

    def _depths(self) -> dict[str, int]:
        depths: dict[str, int] = dict.fromkeys(self.queue.weights, 0)
        depths["relax"] = 0
        for item in self.queue:
            depths[item.plan] += len(item.members)
        for item in self.relax_queue:
            depths["relax"] += len(item.members)
        return depths


def _moved(before: int | None, now: int) -> bool:
    """Worth a Position event: near the front every move counts, further back only a tenth's."""
    if before is None:
        return True
    return before != now and (now < 20 or abs(before - now) >= before // 10)
