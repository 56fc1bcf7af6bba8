"""The one per-job event history an API process keeps: numbered events that SSE clients and waiting
requests follow, replayed from the start (or after a Last-Event-ID) and then live.

Only the latest progress event is kept (with the latest preview seen), so a replay is short. Finished
jobs' logs are remembered for a while (least recently finished forgotten first).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from kiln.service.job_events import JobEvent


@dataclass(eq=False)
class JobLog:
    user_id: str = ""
    events: list[JobEvent] = field(default_factory=list)
    subscribers: list[asyncio.Queue[JobEvent]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    next_id: int = 1

    def publish(self, name: str, data: dict[str, Any]) -> JobEvent:
        event = JobEvent(self.next_id, name, data)
        self.next_id += 1
        if name == "progress" and self.events and self.events[-1].name == "progress":
            # a replay needs the latest step, not every one, and the latest preview seen so far
            preview = self.events[-1].data.get("preview")
            replayed = event if "preview" in data or preview is None else JobEvent(
                event.id, name, {**data, "preview": preview})
            self.events[-1] = replayed
        else:
            self.events.append(event)
        for queue in self.subscribers:
            queue.put_nowait(event)
        if event.terminal:
            self.done.set()
        return event

    @property
    def last(self) -> JobEvent | None:
        return self.events[-1] if self.events else None

    def position(self) -> tuple[int | None, float | None]:
        """The last reported place in line and wait, while the job is queued."""
        return position_of(reversed(self.events))

    async def follow(self, after: int = 0) -> AsyncIterator[JobEvent]:
        """Events numbered above `after`: replayed, then live, ending with the terminal one."""
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        self.subscribers.append(queue)
        try:
            for event in list(self.events):
                if event.id > after:
                    yield event
                if event.terminal:
                    return
            while True:
                event = await queue.get()
                if event.id > after:
                    yield event
                if event.terminal:
                    return
        finally:
            self.subscribers.remove(queue)


def position_of(newest_first: Iterable[JobEvent]) -> tuple[int | None, float | None]:
    """The place in line and wait the latest events report (None, None once the job started)."""
    for event in newest_first:
        if event.name in ("queued", "position"):
            return event.data.get("queue_position"), event.data.get("eta_s")
        if event.name in ("started", "progress") or event.terminal:
            return None, None
    return None, None


class JobLogs:
    """Logs of the jobs this process follows: live ones, and the last `keep_finished` finished ones."""

    def __init__(self, keep_finished: int = 2000) -> None:
        self.live: dict[str, JobLog] = {}
        self.finished: OrderedDict[str, JobLog] = OrderedDict()
        self.keep_finished = keep_finished

    def get(self, job_id: str) -> JobLog | None:
        return self.live.get(job_id) or self.finished.get(job_id)

    def open(self, job_id: str, user_id: str) -> JobLog:
        log = self.get(job_id)
        if log is None:
            log = self.live[job_id] = JobLog(user_id)
        return log

    def publish(self, job_id: str, name: str, data: dict[str, Any]) -> JobEvent | None:
        log = self.live.get(job_id)
        if log is None:
            return None
        event = log.publish(name, data)
        if event.terminal:
            self.finished[job_id] = self.live.pop(job_id)
            while len(self.finished) > self.keep_finished:
                self.finished.popitem(last=False)
        return event
