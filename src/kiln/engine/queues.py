"""Queued work: the fair queue, the idle-only relax queue and the totals admission reads, changed
together so the totals never drift from the queues. It never chooses what runs next nor emits events.
"""

from __future__ import annotations

from kiln.engine.admission import QueueStats
from kiln.engine.fairqueue import FairQueue
from kiln.engine.work import WorkItem


class WorkQueues:
    """Every queued item is in exactly one of the two queues, the one its `relax` names."""

    def __init__(self) -> None:
        self.normal = FairQueue()
        self.relax = FairQueue()
        self.stats = QueueStats()
        self.version = 0
        """Bumped whenever an item enters or leaves a queue, so orders read from them know they are stale."""

    def of(self, item: WorkItem) -> FairQueue:
        return self.relax if item.relax else self.normal

    def push(self, item: WorkItem, *, front: bool = False) -> None:
        self.of(item).push(item, front=front)
        self.stats.add(item.plan, item.user, item.units, item.relax)
        self.version += 1

    def remove(self, item: WorkItem) -> None:
        """Take an item out without running it (cancelled, re-homed or absorbed); no-op if not queued."""
        if self.of(item).remove(item):
            self.stats.remove(item.plan, item.user, item.units, item.relax)
            self.version += 1

    def take(self, item: WorkItem) -> None:
        """Take an item chosen to run, charging its plan and user; its units count as queued until it
        starts."""
        self.of(item).take(item)
        self.version += 1

    def refund(self, item: WorkItem) -> None:
        self.of(item).refund(item)

    def set_weight(self, plan: str, weight: float) -> None:
        self.normal.set_weight(plan, weight)
        self.relax.set_weight(plan, weight)
        self.stats.weights[plan] = weight
