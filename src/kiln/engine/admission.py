"""Admission: how long will a new request wait, and is that within its plan's target?

Within the target: accept. Over it (up to `refuse_at_target_x` times it): accept degraded — fewer
steps (down to half), or a smaller size where the request allows — and say so. Beyond: raise
`Overloaded` with Retry-After from the same estimate. A refusal reads a few in-memory counters and
takes no lock, so it stays cheap when it matters most.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass, field

from kiln.engine.config import EngineConfig
from kiln.engine.types import Admitted, Degradation, EngineRequest
from kiln.errors import Overloaded

MIN_DEGRADED_SIDE = 256


class Throughput:
    """An EWMA of work units per second per worker, measured from real batch durations."""

    def __init__(self, prior_units_per_s: float, alpha: float) -> None:
        self.units_per_s = prior_units_per_s
        self.images_per_s = 0.0
        self.alpha = alpha
        self.samples = 0

    def observe(self, units: float, images: int, duration_s: float) -> None:
        if duration_s <= 0:
            return
        alpha = 1.0 if self.samples == 0 else self.alpha
        self.units_per_s += alpha * (units / duration_s - self.units_per_s)
        self.images_per_s += alpha * (images / duration_s - self.images_per_s)
        self.samples += 1


class UserTotals:
    """Each user's queued units, and how many users hold each total: Σ min(total, cap) over users —
    round robin's share ahead of a request — costs the distinct totals, not the users (10,000 users
    queueing single images have a handful of distinct totals)."""

    def __init__(self) -> None:
        self.units: dict[str, float] = {}
        self._holders: dict[float, int] = {}

    def get(self, user: str, default: float = 0.0) -> float:
        return self.units.get(user, default)

    def __len__(self) -> int:
        return len(self.units)

    def change(self, user: str, delta: float) -> None:
        before = self.units.get(user, 0.0)
        after = before + delta
        if before > 1e-9:
            self._count(before, -1)
        if after <= 1e-9:
            self.units.pop(user, None)
            return
        self.units[user] = after
        self._count(after, 1)

    def sum_min(self, cap: float, exclude: str) -> float:
        """Σ min(total, cap) over every user but `exclude`."""
        total = sum(min(value, cap) * count for value, count in self._holders.items())
        own = self.units.get(exclude)
        return total - min(own, cap) if own is not None else total

    def _count(self, value: float, step: int) -> None:
        bucket = round(value, 6)
        left = self._holders.get(bucket, 0) + step
        if left:
            self._holders[bucket] = left
        else:
            del self._holders[bucket]


@dataclass
class QueueStats:
    """Counters the engine keeps current as work enters and leaves its queues."""

    plan_units: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    user_units: dict[str, UserTotals] = field(default_factory=lambda: defaultdict(UserTotals))
    relax_units: float = 0.0
    relax_user_units: UserTotals = field(default_factory=UserTotals)
    weights: dict[str, float] = field(default_factory=dict)

    def add(self, plan: str, user: str, units: float, relax: bool) -> None:
        if relax:
            self.relax_units += units
            self.relax_user_units.change(user, units)
            return
        self.plan_units[plan] += units
        self.user_units[plan].change(user, units)

    def remove(self, plan: str, user: str, units: float, relax: bool) -> None:
        if relax:
            self.relax_units = max(0.0, self.relax_units - units)
            self.relax_user_units.change(user, -units)
            return
        self.plan_units[plan] = max(0.0, self.plan_units[plan] - units)
        self.user_units[plan].change(user, -units)

    def units_ahead(self, request: EngineRequest) -> float:
        """Queued work that runs before `request` if it joined now (fair-share order, approximated:
        round robin within its plan, weight ratios across plans; relax work waits for all)."""
        own = request.units
        if request.relax:
            users = self.relax_user_units
            mine = users.get(request.user_id, 0.0) + own
            in_relax = mine + users.sum_min(mine, request.user_id)
            return sum(self.plan_units.values()) + in_relax - own
        users = self.user_units.get(request.plan) or UserTotals()
        mine = users.get(request.user_id, 0.0) + own
        in_plan = mine + users.sum_min(mine, request.user_id)
        weight = max(float(request.weight), 1e-9)
        ahead = in_plan - own
        for plan, units in self.plan_units.items():
            if plan != request.plan and units > 0:
                ahead += min(units, in_plan * self.weights.get(plan, 1.0) / weight)
        return ahead


class AdmissionPolicy:
    def __init__(self, config: EngineConfig, throughput: Throughput) -> None:
        self.config = config
        self.throughput = throughput

    def rate_units_per_s(self, workers: float) -> float:
        """`workers` may be fractional (a hot GPU counts as its capacity factor); none live counts as one."""
        return max(self.throughput.units_per_s, 1e-6) * (workers if workers > 0 else 1.0)

    def expected_wait_s(self, stats: QueueStats, request: EngineRequest, running_units: float, workers: float) -> float:
        """Seconds until `request` would start: work ahead of it plus what is still running."""
        return (stats.units_ahead(request) + running_units) / self.rate_units_per_s(workers)

    def admit(self, stats: QueueStats, request: EngineRequest, running_units: float, workers: float) -> Admitted:
        wait_s = self.expected_wait_s(stats, request, running_units, workers)
        target = request.wait_target_s
        if wait_s <= target or request.relax:  # relax work asked to wait for idle time: never refused
            return Admitted(request, wait_s)
        refuse_at = target * self.config.refuse_at_target_x
        if wait_s > refuse_at:
            retry_after = max(1.0, math.ceil(wait_s - refuse_at))
            raise Overloaded(
                f"The server is overloaded: about {wait_s:.0f}s of queued work is ahead of this request "
                f"(the {request.plan} plan's target is {target:.0f}s). Retry in {retry_after:.0f}s.",
                retry_after_s=retry_after,
            )
        degraded, change = degrade(request)
        if change is None:
            return Admitted(request, wait_s)
        wait_s = self.expected_wait_s(stats, degraded, running_units, workers)
        return Admitted(degraded, wait_s, change)


def degrade(request: EngineRequest) -> tuple[EngineRequest, Degradation | None]:
    """Half the steps (not below `min_steps`); else, if the request allows, half the sides."""
    key = request.key
    steps = max(request.min_steps, math.ceil(key.steps / 2))
    width, height = key.width, key.height
    if steps == key.steps and request.allow_smaller and min(width, height) >= 2 * MIN_DEGRADED_SIDE:
        width, height = _round8(width / 2), _round8(height / 2)
    if (steps, width, height) == (key.steps, key.width, key.height):
        return request, None
    new_key = key._replace(steps=steps, width=width, height=height)
    change = Degradation(key.steps, steps, (key.width, key.height), (width, height))
    return dataclasses.replace(request, key=new_key), change


def _round8(value: float) -> int:
    return max(8, int(round(value / 8)) * 8)
