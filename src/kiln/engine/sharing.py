"""Identical seeded requests computed once: live work items indexed by the images they draw, so a
twin joins work already queued or running. Never shares edits (they have no identity), and never
lets a request join work that would make it wait longer than its own would.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from kiln.engine.types import EngineRequest
from kiln.engine.work import RELAX_WEIGHT, WorkItem


class Sharing:
    """The identity index; the caller keeps it in step by `add`ing new items and `forget`ting done ones."""

    def __init__(self) -> None:
        self._by_identity: dict[tuple[object, ...], list[WorkItem]] = defaultdict(list)

    def add(self, item: WorkItem) -> None:
        identity = item.leader.identity()
        if identity is not None:
            self._by_identity[identity].append(item)

    def shareable(self, request: EngineRequest, weights: Mapping[str, float]) -> WorkItem | None:
        """A live item drawing exactly these images that this request may join without waiting longer."""
        identity = request.identity()
        if identity is None:
            return None
        for item in self._by_identity.get(identity, ()):
            if not item.members:
                continue
            if item.batch_id is not None:
                return item
            if item.weight(weights) >= _weight_of_request(request):
                return item
        return None

    def absorb(self, item: WorkItem) -> list[WorkItem]:
        """Queued twins of an item about to run give it their members (each owner still gets its own
        output). Returns the emptied twins: the caller takes them out of the queue."""
        identity = item.leader.identity()
        if identity is None:
            return []
        absorbed = []
        for twin in list(self._by_identity.get(identity, ())):
            if twin is item or twin.batch_id is not None or not twin.members:
                continue
            item.members.extend(twin.members)
            twin.members = []
            self.forget(twin)
            absorbed.append(twin)
        return absorbed

    def forget(self, item: WorkItem) -> None:
        identity = item.leader.identity()
        if identity is None:
            return
        twins = self._by_identity.get(identity)
        if twins and item in twins:
            twins.remove(item)
            if not twins:
                del self._by_identity[identity]


def _weight_of_request(request: EngineRequest) -> float:
    return RELAX_WEIGHT if request.relax else float(request.weight)
