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
from contextlib import closing

from kiln.engine.types import BatchKey
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
    """One plan's users, their queued items, and a heap of (pass, last served, user) read lazily: an
    entry is live while it matches the user's current order, so choosing the next user costs a few
    heap pops, not a sort of every user (10,000 users queueing is the normal state under a flood)."""

    def __init__(self) -> None:
        self.users: dict[str, deque[WorkItem]] = {}
        self.stride = Stride()
        self.keys: dict[BatchKey, int] = {}
        """Queued items per batch key, so a batch of one key skips plans that hold none of it."""
        self._heap: list[tuple[float, int, str]] = []

    def note(self, user: str) -> None:
        """The user's pass changed (or it arrived): its order is read from a fresh heap entry."""
        if user in self.users:
            passes, last = self.stride.order(user)
            heapq.heappush(self._heap, (passes, last, user))
            if len(self._heap) > 2 * len(self.users) + 64:
                self._heap = [(*self.stride.order(u), u) for u in self.users]
                heapq.heapify(self._heap)

    def users_in_order(self) -> Iterator[str]:
        """Users with queued items, smallest pass first (ties: served least recently)."""
        heap, popped, seen = self._heap, [], set()
        try:
            while heap:
                entry = heapq.heappop(heap)
                passes, last, user = entry
                if user in seen or user not in self.users or self.stride.order(user) != (passes, last):
                    continue  # stale: a newer entry holds this user's order
                seen.add(user)
                popped.append(entry)
                yield user
        finally:
            for entry in popped:
                heapq.heappush(heap, entry)


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
            plan.note(item.user)
        if front:
            items.appendleft(item)
        else:
            items.append(item)
        plan.keys[item.key] = plan.keys.get(item.key, 0) + 1
        self._count += 1

    def remove(self, item: WorkItem) -> bool:
        plan = self._plans.get(item.plan)
        items = plan.users.get(item.user) if plan else None
        if items is None or item not in items:
            return False
        items.remove(item)
        left = plan.keys[item.key] - 1
        if left:
            plan.keys[item.key] = left
        else:
            del plan.keys[item.key]
        self._count -= 1
        self._prune(item.plan, item.user)
        return True

    def take(self, item: WorkItem) -> None:
        """Remove an item chosen by `peek` and charge its plan and user for it."""
        plan = self._plans[item.plan]
        plan.stride.charge(item.user, item.units, 1.0)
        plan.note(item.user)
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
            plan.note(item.user)

    def _prune(self, plan_name: str, user: str) -> None:
        plan = self._plans[plan_name]
        if not plan.users[user]:
            del plan.users[user]
            plan.stride.forget(user)
        if not plan.users:
            del self._plans[plan_name]
            self._stride.forget(plan_name)

    # ---- choice

    def peek(
        self,
        eligible: Callable[[WorkItem], bool] | None = None,
        *,
        plan_ok: Callable[[str], bool] | None = None,
        key: BatchKey | None = None,
    ) -> WorkItem | None:
        """The item that goes next among those `eligible` accepts, without taking it; plans that
        `plan_ok` rejects, or that hold no item of `key`, are skipped whole."""
        for plan_name in sorted(self._plans, key=self._stride.order):
            plan = self._plans[plan_name]
            if (key is not None and key not in plan.keys) or (plan_ok is not None and not plan_ok(plan_name)):
                continue
            with closing(plan.users_in_order()) as users:  # closed at once: its pops are pushed back
                for user in users:
                    for item in plan.users[user]:
                        if eligible is None or eligible(item):
                            return item
        return None

    def with_key(self, key: BatchKey) -> Iterator[WorkItem]:
        """The queued items of one batch key (any order); cheap when no plan holds that key."""
        for plan in self._plans.values():
            if key in plan.keys:
                for items in plan.users.values():
                    for item in items:
                        if item.key == key:
                            yield item

    def order(self, limit: int | None = None) -> list[WorkItem]:
        """Queued items in the order they would run if nothing else arrived (a dry run): all of
        them, or the first `limit`."""
        plan_heap = [(self._stride.passes[p], self._stride.last_served.get(p, 0), p) for p in self._plans]
        heapq.heapify(plan_heap)
        user_heaps: dict[str, list[tuple[float, int, str]]] = {}
        for name, plan in self._plans.items():
            passes, last = plan.stride.passes, plan.stride.last_served
            if limit is None or limit >= len(plan.users):
                users = list(plan.users)
            else:  # the first `limit` places come from the first `limit` users at most
                with closing(plan.users_in_order()) as in_order:
                    users = list(itertools.islice(in_order, limit))
            heap = [(passes[u], last.get(u, 0), u) for u in users]
            heapq.heapify(heap)
            user_heaps[name] = heap
        cursors: dict[str, dict[str, int]] = {name: {} for name in self._plans}
        result: list[WorkItem] = []
        wanted = self._count if limit is None else min(limit, self._count)
        serial = itertools.count(10**12)
        while plan_heap and len(result) < wanted:
            plan_pass, _, name = plan_heap[0]
            users, heap, cursor = self._plans[name].users, user_heaps[name], cursors[name]
            user_pass, _, user = heap[0]
            index = cursor.get(user, 0)
            queued = users[user]
            item = queued[index]
            result.append(item)
            if index + 1 < len(queued):
                cursor[user] = index + 1
                heapq.heapreplace(heap, (user_pass + item.units, next(serial), user))
            else:
                heapq.heappop(heap)
            if heap:
                weight = self.weights.get(name, 1.0)
                heapq.heapreplace(plan_heap, (plan_pass + item.units / weight, next(serial), name))
            else:
                heapq.heappop(plan_heap)
        return result
