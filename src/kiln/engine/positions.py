"""Where queued jobs stand: the queue's run order, cheap guesses for arrivals, waits from measured
throughput, Position events when a job's place changes, and queue depths for metrics. It only reads
the queues; it never reorders them or changes a job's fate.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kiln.engine.admission import AdmissionPolicy
from kiln.engine.batches import RunningBatch, running_units
from kiln.engine.metrics import EngineMetrics
from kiln.engine.queues import WorkQueues
from kiln.engine.types import EngineEvent, EngineRequest, Position
from kiln.engine.work import WorkItem


FRONT = 1000
"""Places read by the rounds between two full ones."""


class Positions:
    """Remembers the place each job was last told, and when; the order is cached until the queues change."""

    def __init__(
        self,
        queues: WorkQueues,
        running: dict[str, RunningBatch],
        admission: AdmissionPolicy,
        workers: Callable[[], float],
        *,
        interval_s: float,
        metrics: EngineMetrics | None,
    ) -> None:
        self._queues = queues
        self._running = running
        self._admission = admission
        self._workers = workers
        self._interval_s = interval_s
        self._metrics = metrics
        self._told: dict[str, int] = {}
        self._order: list[WorkItem] | None = None
        self._order_version = -1
        self._told_version = queues.version  # nothing has moved yet
        self._told_at = float("-inf")
        self._full_at = float("-inf")
        self._gap_s = interval_s
        """Least time between two full rounds: interval_s, or 20× what the last one cost, so telling
        100,000 queued jobs where they stand never takes more than a twentieth of the engine's time."""
        self._forced = False

    # ---- guesses and waits

    def guess(self, request: EngineRequest, held: int, ahead: float | None = None) -> int:
        """Cheap: about how many queued jobs would run before `request` if it joined now."""
        if ahead is None:
            ahead = self._queues.stats.units_ahead(request)
        queued = len(self._queues.normal) + held + (len(self._queues.relax) if request.relax else 0)
        return min(queued, round(ahead / max(request.units, 1e-9)))

    def queued_guess(self, item: WorkItem, held: int) -> tuple[int, float]:
        """Cheap, for the Queued event: its place and wait from one estimate of the work ahead;
        exact positions follow within interval_s."""
        request = item.leader
        ahead = self._queues.stats.units_ahead(request)
        running = running_units(self._running.values())
        wait_s = (ahead + running) / self._admission.rate_units_per_s(self._workers())
        if item.batch_id is not None:
            return 0, wait_s
        return self.guess(request, held, ahead), wait_s

    def index_of(self, item: WorkItem) -> int | None:
        """Queued items ahead of this one in the run order; None if it is not queued."""
        for index, queued in enumerate(self.order()):
            if queued is item:
                return index
        return None

    def wait_s(self, item: WorkItem) -> float | None:
        """Expected seconds until this queued item starts; None if it is not queued."""
        ahead = running_units(self._running.values())
        for queued in self.order():
            if queued is item:
                return ahead / self._admission.rate_units_per_s(self._workers())
            ahead += queued.units
        return None

    def order(self) -> list[WorkItem]:
        if self._order is None or self._order_version != self._queues.version:
            self._order = self._queues.normal.order() + self._queues.relax.order()
            self._order_version = self._queues.version
        return self._order

    # ---- Position events

    def forget(self, job_id: str) -> None:
        """The job left the queue (started, cancelled): its next place, if any, is news."""
        self._told.pop(job_id, None)

    def force(self) -> None:
        """Tell everyone at the next chance, interval or not (requeued work jumped the line)."""
        self._forced = True

    def retell(self) -> None:
        """Every queued job's wait changed (the fleet's capacity did): tell each at the next chance."""
        self._told.clear()
        self._forced = True

    def emit_changed(self, now: float, emit: Callable[[EngineEvent], None]) -> None:
        """Position events for jobs whose place changed, when work left the queue or every interval.

        A round reads the whole queue's order; when that is costly (100,000 jobs queued) full rounds
        come at most every twentieth of the time, and the rounds between read only the first FRONT
        places, where places change every dispatch (deeper ones move by less than a tenth meanwhile)."""
        due = self._told_version != self._queues.version
        if not (due or self._forced):
            return
        if not self._forced and now - self._told_at < self._interval_s:
            return  # a busy queue moves every dispatch; tell people about it once an interval
        full = self._forced or now - self._full_at >= self._gap_s
        started = time.perf_counter()
        self._told_version = self._queues.version
        self._forced = False
        self._told_at = now
        ahead = running_units(self._running.values())
        rate = self._admission.rate_units_per_s(self._workers())
        for index, item in enumerate(self.order() if full else self._front()):
            for member in item.members:
                if _moved(self._told.get(member.job_id), index):
                    self._told[member.job_id] = index
                    emit(Position(member.job_id, index, ahead / rate))
            ahead += item.units
        if full:
            if self._metrics:
                self._metrics.queue_depths(self.depths())
            self._full_at = now
            self._gap_s = max(self._interval_s, 20 * (time.perf_counter() - started))

    def _front(self) -> list[WorkItem]:
        front = self._queues.normal.order(FRONT)
        if len(front) < FRONT:
            front += self._queues.relax.order(FRONT - len(front))
        return front

    def depths(self) -> dict[str, int]:
        depths: dict[str, int] = dict.fromkeys(self._queues.normal.weights, 0)
        depths["relax"] = 0
        for item in self._queues.normal:
            depths[item.plan] += len(item.members)
        for item in self._queues.relax:
            depths["relax"] += len(item.members)
        return depths


def _moved(before: int | None, now: int) -> bool:
    """Worth a Position event: near the front every move counts, further back only a tenth's."""
    if before is None:
        return True
    return before != now and (now < 20 or abs(before - now) >= before // 10)
