"""Batch forming: which queued items run together next, whether a partial batch waits for more of
its key, how far lower-weight work may ride along, and which running batch yields to better work.
It only chooses (and takes what it chose from the queue); starting batches and events stay with the core.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from kiln.engine.admission import Throughput
from kiln.engine.batches import RunningBatch
from kiln.engine.config import EngineConfig
from kiln.engine.fairqueue import FairQueue
from kiln.engine.limits import BatchLimits
from kiln.engine.queues import WorkQueues
from kiln.engine.work import RELAX_WEIGHT, WorkItem


class BatchFormer:
    """Knows the images running per plan (for plan caps) and each plan's latest arrival (for bounding)."""

    def __init__(
        self,
        config: EngineConfig,
        queues: WorkQueues,
        limits: BatchLimits,
        plan_caps: dict[str, int],
        running: dict[str, RunningBatch],
        throughput: Throughput | None = None,
        workers: Callable[[], int] | None = None,
    ) -> None:
        self.config = config
        self._throughput = throughput
        self._workers = workers
        self._queues = queues
        self._limits = limits
        self._plan_caps = plan_caps
        self._running = running
        self._running_images: dict[str, int] = defaultdict(int)
        self._last_arrival: dict[str, float] = {}
        self._priority_plan: str | None = None
        self.next_wake_at: float | None = None
        """Clock time at which a held partial batch is due; None when nothing is held."""

    # ---- what the core tells it

    def arrived(self, plan: str, now: float) -> None:
        self._last_arrival[plan] = now

    def started(self, item: WorkItem) -> None:
        self._running_images[item.plan] += item.images

    def ended(self, item: WorkItem) -> None:
        self._running_images[item.plan] -= item.images

    # ---- choices

    def form(self, now: float) -> list[WorkItem] | None:
        """The items of the next batch, taken from their queue; None if nothing should start now."""
        queue = self._queues.normal
        head = None
        if self._priority_plan is not None:
            head = queue.peek(lambda i: i.plan == self._priority_plan and self._eligible(i))
            self._priority_plan = None
        head = head or queue.peek(self._eligible)
        if head is None:
            queue = self._queues.relax  # idle-only: nothing else can run now
            head = queue.peek(self._eligible)
        if head is None:
            return None
        cap = self._limits.cap(head.key, self.config.max_batch_images)
        top = self._top_weight(now, head, cap)
        low_cap = self.config.bound_batch_images

        def low(item: WorkItem) -> bool:  # bounded: someone better is waiting or arriving
            return top is not None and self._weight_of(item) < top

        if not head.isolate and self._hold(queue, head, min(cap, low_cap) if low(head) else cap, now):
            return None
        items = [head]
        self._queues.take(head)
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

        def plan_ok(plan: str) -> bool:  # whole plans that cannot add an image are skipped unread
            weight = RELAX_WEIGHT if queue is self._queues.relax else queue.weights.get(plan, 1.0)
            if top is not None and low_images >= low_cap and weight < top:
                return False
            plan_cap = self._plan_caps.get(plan)
            running = self._running_images[plan] + pending[plan]
            return plan_cap is None or running == 0 or running < plan_cap

        while not head.isolate and images < cap:
            item = queue.peek(fits, plan_ok=plan_ok, key=head.key)
            if item is None:
                break
            self._queues.take(item)
            items.append(item)
            images += item.images
            low_images += item.images if low(item) else 0
            pending[item.plan] += item.images
        return items

    def choose_victim(self) -> RunningBatch | None:
        """A running batch to preempt for better queued work, at most one in flight at a time."""
        if any(b.preempting for b in self._running.values()):
            return None
        waiting = self._queues.normal.peek(self._eligible)
        if waiting is None:
            return None
        weight = self._weight_of(waiting)
        victims = [
            b
            for b in self._running.values()
            if b.best_weight < weight
            and not b.cancelling
            and b.progress < self.config.preempt_max_progress
            and all(i.preemptions < self.config.max_preemptions for i in b.items)
        ]
        if not victims:
            return None
        self._priority_plan = waiting.plan  # the freed worker goes to the work that asked for it
        return min(victims, key=lambda b: (b.best_weight, b.progress))

    def _hold(self, queue: FairQueue, head: WorkItem, cap: int, now: float) -> bool:
        """Keep a partial batch back for more of its key, up to max_batch_wait_s from its oldest."""
        if self.config.max_batch_wait_s <= 0:
            return False
        images, oldest = 0, head.enqueued_at
        for item in queue.with_key(head.key):
            if not item.isolate and self._eligible(item):
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
        cap = self._plan_caps.get(item.plan)
        if cap is None:
            return True
        running = self._running_images[item.plan] + pending
        return running == 0 or running + item.images <= cap

    def _top_weight(self, now: float, head: WorkItem, cap: int) -> float | None:
        """With bounding on: the highest weight queued or arrived within bound_window_s. Work below
        it rides in a batch only up to bound_batch_images, so no batch grows long on its account."""
        if self.config.preemption not in ("bound", "both") or self._worker_frees_soon(head, cap):
            return None
        weights = self._queues.normal.weights
        recent = [p for p, t in self._last_arrival.items() if now - t <= self.config.bound_window_s]
        return max(
            (weights.get(p, 1.0) for p in [*self._queues.normal.plans_waiting(), *recent]), default=None
        )

    def _worker_frees_soon(self, head: WorkItem, cap: int) -> bool:
        """Some worker is expected to free up within bound_gap_s (a full batch of this key's time,
        spread over the workers): better work that arrives gets one that soon anyway — the normal
        state with many workers — so nothing needs bounding and every plan keeps its full share."""
        if self._throughput is None or self._workers is None:
            return False
        full_batch_s = cap * head.key.units_per_image() / max(self._throughput.units_per_s, 1e-9)
        return full_batch_s / max(self._workers(), 1) < self.config.bound_gap_s

    def _weight_of(self, item: WorkItem) -> float:
        return item.weight(self._queues.normal.weights)
