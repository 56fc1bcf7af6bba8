"""EventRecorder: a listener that keeps every job's engine events, so tests can wait for a job's end.
The AsyncEngine keeps no per-job history (the API's job log is the only one); tests record their own.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator

from kiln.engine.types import TERMINAL_EVENTS, EngineEvent


class EventRecorder:
    """Register with `engine.add_listener(recorder)`; called on the engine's loop, in event order."""

    def __init__(self) -> None:
        self._events: dict[str, list[EngineEvent]] = defaultdict(list)
        self._waiters: list[asyncio.Event] = []

    def __call__(self, event: EngineEvent) -> None:
        self._events[event.job_id].append(event)
        for waiter in self._waiters:
            waiter.set()

    def events(self, job_id: str) -> list[EngineEvent]:
        """This job's events so far, in order."""
        return list(self._events.get(job_id, ()))

    async def stream(self, job_id: str) -> AsyncIterator[EngineEvent]:
        """This job's events from the start, then live, ending after the terminal one."""
        seen = 0
        while True:
            events = self._events.get(job_id, [])
            while seen < len(events):
                event = events[seen]
                seen += 1
                yield event
                if isinstance(event, TERMINAL_EVENTS):
                    return
            await self._next_event()

    async def wait(self, job_id: str, timeout_s: float) -> EngineEvent | None:
        """The job's terminal event (Completed · Failed · Cancelled), or None after timeout_s."""

        async def terminal() -> EngineEvent | None:
            async for event in self.stream(job_id):
                if isinstance(event, TERMINAL_EVENTS):
                    return event
            return None

        try:
            return await asyncio.wait_for(terminal(), timeout_s)
        except TimeoutError:
            return None

    async def _next_event(self) -> None:
        waiter = asyncio.Event()
        self._waiters.append(waiter)
        try:
            await waiter.wait()
        finally:
            self._waiters.remove(waiter)
