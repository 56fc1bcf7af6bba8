"""Every job's whereabouts: the work item each live job belongs to, the recently finished ones (so
a repeated add is refused) and the events not yet handed out. It records fates; it never decides one.
"""

from __future__ import annotations

from collections import OrderedDict

from kiln.engine.sharing import Sharing
from kiln.engine.types import EngineEvent
from kiln.engine.work import WorkItem


class JobBook:
    def __init__(self, finished_memory: int, sharing: Sharing) -> None:
        self.item_of: dict[str, WorkItem] = {}
        """Live jobs (queued or running) → the work item computing their images."""
        self.finished_memory = finished_memory
        self._sharing = sharing
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._events: list[EngineEvent] = []

    def knows(self, job_id: str) -> bool:
        return job_id in self.item_of or job_id in self._finished

    def emit(self, event: EngineEvent) -> None:
        self._events.append(event)

    def drain(self) -> list[EngineEvent]:
        """The events since the last drain, in order."""
        events, self._events = self._events, []
        return events

    def finish(self, job_id: str) -> None:
        self._finished[job_id] = None
        while len(self._finished) > self.finished_memory:
            self._finished.popitem(last=False)

    def close(self, item: WorkItem) -> None:
        """The item is done: its jobs are finished and it draws nothing for anyone any more."""
        for member in item.members:
            self.item_of.pop(member.job_id, None)
            self.finish(member.job_id)
        item.members = []
        self._sharing.forget(item)
