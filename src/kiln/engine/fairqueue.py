"""Who runs next: stride scheduling (virtual time) across plans by weight, and across the users of
one plan with equal weights, so one user's twenty jobs never starve another user's one.

Costs are work units (image-steps at 512×512). A plan or user that goes idle and comes back starts
at the current virtual time: idling earns no credit, overuse is remembered.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterator

from kiln.engine.work import WorkItem

COMPACT_EVERY = 1024
"""Takes between two sweeps of idle users' pass values."""


class Stride:
    """Pass values per member; the smallest pass goes next, ties to the one served least recently."""

    def __init__(self) -> None:
        self.passes: dict[str, float] = {}
        self.last_served: dict[str, int] = {}
        self.vtime = 0.0
        self._serial = itertools.count(1)

    def activate(self, member: str) -> None:
        self.passes[member] = max(self.passes.get(member, 0.0), self.vtime)

    def order(self, member: str) -> tuple[float, int]:
        return (self.passes[member], self.last_served.get(member, 0))

    def charge(self, member: str, cost: float, weight: float) -> None:
        self.vtime = max(self.vtime, self.passes[member])
        self.passes[member] += cost / weight
        self.last_served[member] = next(self._serial)

    def refund(self, member: str, cost: float, weight: float) -> None:
        self.passes[member] = max(self.vtime, self.passes.get(member, 0.0) - cost / weight)

    def forget(self, member: str) -> None:
        """Drop an idle member whose pass is behind virtual time (it would restart there anyway)."""
        if self.passes.get(member, 0.0) <= self.vtime:
            self.passes.pop(member, None)
            self.last_served.pop(member, None)

    def compact(self, active: set[str] | dict[str, object]) -> None:
        """Forget idle members that virtual time has caught up with (bounded memory under churn)."""
        for member in [m for m in self.passes if m not in active]:
            self.forget(member)


class _PlanQueue:
    def __init__(self) -> None:
        self.users: dict[str, deque[WorkItem]] = {}
        self.stride = Stride()


class FairQueue:
    """Queued work items by plan and user. Not thread-safe: the engine owns it."""

    def __init__(self) -> None:
        self._plans: dict[str, _PlanQueue] = {}
        self._stride = Stride()
        self.weights: dict[str, float] = {}
        self._count = 0
        self._takes = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[WorkItem]:
        for plan in self._plans.values():
            for items in plan.users.values():
                yield from items

    def plans_waiting(self) -> list[str]:
        return list(self._plans)

    def set_weight(self, plan: str, weight: float) -> None:
        self.weights[plan] = max(weight, 1e-9)

    # ---- changes

    def push(self, item: WorkItem, *, front: bool = False) -> None:
        plan = self._plans.get(item.plan)
        if plan is None:
            plan = self._plans[item.plan] = _PlanQueue()
            self._stride.activate(item.plan)
        items = plan.users.get(item.user)
        if items is None:
            items = plan.users[item.user] = deque()
            plan.stride.activate(item.user)
        if front:
            items.appendleft(item)
        else:
            items.append(item)
        self._count += 1

    def remove(self, item: WorkItem) -> bool:
        plan = self._plans.get(item.plan)
        items = plan.users.get(item.user) if plan else None
        if items is None or item not in items:
            return False
        items.remove(item)
        self._count -= 1
        self._prune(item.plan, item.user)
        return True

    def take(self, item: WorkItem) -> None:
        """Remove an item chosen by `peek` and charge its plan and user for it."""
        plan = self._plans[item.plan]
        plan.stride.charge(item.user, item.units, 1.0)
        self._stride.charge(item.plan, item.units, self.weights.get(item.plan, 1.0))
        self.remove(item)
        self._takes += 1
        if self._takes % COMPACT_EVERY == 0:
            for queued in self._plans.values():
                queued.stride.compact(queued.users)

    def refund(self, item: WorkItem) -> None:
        """Give back what `take` charged (a preempted or lost batch is not paid for twice)."""
        self._stride.refund(item.plan, item.units, self.weights.get(item.plan, 1.0))
        plan = self._plans.get(item.plan)
        if plan is not None and item.user in plan.stride.passes:
            plan.stride.refund(item.user, item.units, 1.0)

    def _prune(self, plan_name: str, user: str) -> None:
        plan = self._plans[plan_name]
        if not plan.users[user]:
            del plan.users[user]
            plan.stride.forget(user)
        if not plan.users:
            del self._plans[plan_name]
            self._stride.forget(plan_name)

    # ---- choice

    def peek(self, eligible: Callable[[WorkItem], bool] | None = None) -> WorkItem | None:
        """The item that goes next among those `eligible` accepts, without taking it."""
        for plan_name in sorted(self._plans, key=self._stride.order):
            plan = self._plans[plan_name]
            for user in sorted(plan.users, key=plan.stride.order):
                for item in plan.users[user]:
                    if eligible is None or eligible(item):
                        return item
        return None

    def order(self) -> list[WorkItem]:
        """Every queued item in the order it would run if nothing else arrived (a dry run)."""
        plan_passes = {p: self._stride.passes[p] for p in self._plans}
        plan_heap = [(plan_passes[p], self._stride.last_served.get(p, 0), p) for p in self._plans]
        heapq.heapify(plan_heap)
        user_heaps: dict[str, list[tuple[float, int, str]]] = {}
        cursors: dict[tuple[str, str], int] = {}
        for name, plan in self._plans.items():
            heap = [(plan.stride.passes[u], plan.stride.last_served.get(u, 0), u) for u in plan.users]
            heapq.heapify(heap)
            user_heaps[name] = heap
        result: list[WorkItem] = []
        serial = itertools.count(10**12)
        while plan_heap:
            plan_pass, _, name = heapq.heappop(plan_heap)
            plan = self._plans[name]
            heap = user_heaps[name]
            user_pass, _, user = heapq.heappop(heap)
            index = cursors.get((name, user), 0)
            item = plan.users[user][index]
            result.append(item)
            cursors[(name, user)] = index + 1
            if index + 1 < len(plan.users[user]):
                heapq.heappush(heap, (user_pass + item.units, next(serial), user))
            if heap:
                weight = self.weights.get(name, 1.0)
                heapq.heappush(plan_heap, (plan_pass + item.units / weight, next(serial), name))
        return result
