"""Worker capacity: the share of its time each worker slot may spend running batches (1.0: all of it).

A slot below 1.0 (a hot GPU, as the thermal guard decides) rests after each batch in proportion to
the batch it ran — `busy_s × (1 − f) / f` — so its duty cycle, and so its heat, is `f`; admission
counts the fleet as the sum of the factors, so ETAs, degradations and refusals follow the moment a
factor changes. It knows slots and seconds only (never GPUs, temperatures or plans). Thread-safe:
executors report batch ends from their own threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

MIN_FACTOR = 0.05
"""The lowest factor a slot may get: a hot GPU still finishes work, only more slowly."""


class Capacity:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._factors: dict[int, float] = {}
        self._rest_until: dict[int, float] = {}

    def set_factor(self, slot: int, factor: float) -> None:
        """Set a slot's share of time (clamped to MIN_FACTOR…1); 1.0 also ends a rest under way."""
        factor = min(1.0, max(MIN_FACTOR, float(factor)))
        with self._lock:
            if factor >= 1.0:
                self._factors.pop(slot, None)
                self._rest_until.pop(slot, None)
            else:
                self._factors[slot] = factor

    def factor(self, slot: int) -> float:
        with self._lock:
            return self._factors.get(slot, 1.0)

    def factors(self) -> dict[int, float]:
        """The slots below full capacity."""
        with self._lock:
            return dict(self._factors)

    def effective_slots(self, total_slots: int) -> float:
        """The fleet's capacity in whole-worker units: each live slot counts as its factor."""
        with self._lock:
            lost = sum(1.0 - f for slot, f in self._factors.items() if slot < total_slots)
        return max(0.0, total_slots - lost)

    # ---- the executor's gate

    def may_start(self, slot: int) -> bool:
        """May this slot take a batch now (False while it rests)?"""
        with self._lock:
            until = self._rest_until.get(slot)
            if until is None:
                return True
            if self._clock() >= until:
                del self._rest_until[slot]
                return True
            return False

    def ran(self, slot: int, busy_s: float) -> None:
        """A batch on this slot ended after `busy_s`: a slot below full capacity rests for its share."""
        with self._lock:
            factor = self._factors.get(slot)
            if factor is None or busy_s <= 0:
                return
            self._rest_until[slot] = self._clock() + busy_s * (1.0 - factor) / factor

    def next_open_at(self) -> float | None:
        """Clock time at which the earliest resting slot may start again; None when none rests."""
        with self._lock:
            return min(self._rest_until.values(), default=None)
