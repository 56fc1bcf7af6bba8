"""A unit of queued work: one request's images, owned by one or more jobs (identical seeded
requests are computed once). The engine's bookkeeping, never sent across a process boundary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kiln.engine.types import BatchKey, EngineRequest

RELAX_WEIGHT = 0.0
"""Relax work's weight: below every plan's, so it never outranks anything."""


@dataclass(eq=False)
class WorkItem:
    """Queued under its leader's plan and user; every live member gets the result."""

    work_id: str
    leader: EngineRequest
    members: list[EngineRequest]
    enqueued_at: float
    attempts: int = 0
    """Starts so far (including those before a restart, from the request)."""
    crashes: int = 0
    """Times a worker died while running it."""
    isolate: bool = False
    """Run alone next time (after its batch failed or lost a worker), so blame is exact."""
    preemptions: int = 0
    """Times it was stopped to let higher-weight work run (bounded by config.max_preemptions)."""
    seq: int = 0
    """Admission order, a stable tie-break."""
    batch_id: str | None = None
    """The running batch it is in; None while queued."""

    @property
    def plan(self) -> str:
        return self.leader.plan

    @property
    def user(self) -> str:
        return self.leader.user_id

    @property
    def key(self) -> BatchKey:
        return self.leader.key

    @property
    def images(self) -> int:
        return self.leader.n

    @property
    def units(self) -> float:
        return self.leader.units

    @property
    def relax(self) -> bool:
        return self.leader.relax

    def weight(self, weights: Mapping[str, float]) -> float:
        """Its plan's weight from `weights` (relax work: RELAX_WEIGHT)."""
        return RELAX_WEIGHT if self.relax else weights.get(self.plan, 1.0)
