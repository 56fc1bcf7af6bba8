"""The async driver: runs `EngineCore.step()` in an asyncio task and routes events to listeners
(the service's JobRunner) and to per-job streams (SSE). All engine calls happen on the event loop's
thread, so the core needs no lock; the executor wakes the loop from its own thread when outputs land.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.metrics import EngineMetrics
from kiln.engine.types import TERMINAL_EVENTS, Admitted, EngineEvent, EngineRequest, Progress

log = logging.getLogger(__name__)

Listener = Callable[[EngineEvent], Awaitable[None] | None]


class AsyncEngine:
    """`start()` → `admit()`/`add_request()`/`cancel()` → events → `stop()`."""

    def __init__(self, core: EngineCore, *, idle_poll_s: float = 0.5, history_jobs: int = 2000) -> None:
        self.core = core
        self.idle_poll_s = idle_poll_s
        self._history: dict[str, list[EngineEvent]] = {}
        self._finished: OrderedDict[str, list[EngineEvent]] = OrderedDict()
        self._history_jobs = history_jobs
        self._streams: dict[str, list[asyncio.Queue[EngineEvent]]] = defaultdict(list)
        self._listeners: list[tuple[Listener, asyncio.Queue[EngineEvent] | None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        loop, wake = self._loop, self._wake
        self.core.executor.set_notify(lambda: loop.call_soon_threadsafe(wake.set))
        for listener, queue in self._listeners:  # those added before start
            if queue is not None:
                self._tasks.append(asyncio.create_task(self._feed(listener, queue)))
        self._tasks.append(asyncio.create_task(self._run(), name="kiln-engine"))

    async def stop(self) -> None:
        self.core.executor.set_notify(None)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._loop = None

    # ---- what the service calls

    def admit(self, request: EngineRequest) -> Admitted:
        """Accept (possibly degraded) or raise `kiln.errors.Overloaded`; changes nothing."""
        return self.core.admit(request)

    def hold(self, request: EngineRequest) -> None:
        """Count an admitted request as queued until `unhold` (while the service creates its job)."""
        self.core.hold(request)

    def unhold(self, request: EngineRequest) -> None:
        self.core.unhold(request)

    def position_guess(self, request: EngineRequest) -> int:
        """About how many queued jobs would run before `request` if it joined now."""
        return self.core.position_guess(request)

    def add_request(self, request: EngineRequest) -> bool:
        """Queue a job (idempotent by job id: False if already known)."""
        added = self.core.add_request(request)
        if added:
            self._history.setdefault(request.job_id, [])
        self._poke()
        return added

    def cancel(self, job_id: str, user_id: str | None = None) -> bool:
        cancelled = self.core.cancel(job_id, user_id)
        self._poke()
        return cancelled

    def update_plan(self, plan: str, **changes: Any) -> None:
        self.core.update_plan(plan, **changes)
        self._poke()

    def queue_position(self, job_id: str) -> int | None:
        return self.core.queue_position(job_id)

    def eta_s(self, job_id: str) -> float | None:
        return self.core.eta_s(job_id)

    def add_listener(self, listener: Listener) -> None:
        """Every event of every job, in order. A coroutine listener runs in its own task, one event
        at a time, so a slow database write never reorders or blocks the engine."""
        if inspect.iscoroutinefunction(listener):
            queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
            self._listeners.append((listener, queue))
            if self._loop is not None:
                self._tasks.append(asyncio.create_task(self._feed(listener, queue)))
        else:
            self._listeners.append((listener, None))

    async def events(self, job_id: str) -> AsyncIterator[EngineEvent]:
        """This job's events from the start (replayed), then live, ending after the terminal one."""
        past = list(self._finished.get(job_id) or self._history.get(job_id) or [])
        if not past and job_id not in self._history:
            return
        queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        if job_id in self._history:
            self._streams[job_id].append(queue)
        try:
            for event in past:
                yield event
                if isinstance(event, TERMINAL_EVENTS):
                    return
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, TERMINAL_EVENTS):
                    return
        finally:
            streams = self._streams.get(job_id)
            if streams and queue in streams:
                streams.remove(queue)
                if not streams:
                    del self._streams[job_id]

    async def wait(self, job_id: str, timeout_s: float | None = None) -> EngineEvent | None:
        """The job's terminal event (Completed · Failed · Cancelled), or None on timeout/unknown."""
        async def terminal() -> EngineEvent | None:
            async for event in self.events(job_id):
                if isinstance(event, TERMINAL_EVENTS):
                    return event
            return None

        try:
            return await asyncio.wait_for(terminal(), timeout_s)
        except TimeoutError:
            return None

    # ---- the loop

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            try:
                events = self.core.step()
            except Exception:  # a bug must not stop every job in the house
                log.exception("engine step failed")
                events = []
                await asyncio.sleep(self.idle_poll_s)
            self._route(events)
            if events:
                await asyncio.sleep(0)
                continue
            timeout = self.idle_poll_s
            if self.core.next_wake_at is not None:
                timeout = min(timeout, max(0.0, self.core.next_wake_at - self.core.clock()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _route(self, events: list[EngineEvent]) -> None:
        for event in events:
            self._remember(event)
            for queue in self._streams.get(event.job_id, ()):
                queue.put_nowait(event)
            for listener, queue in self._listeners:
                if queue is not None:
                    queue.put_nowait(event)
                    continue
                try:
                    listener(event)
                except Exception:
                    log.exception("engine listener failed on %s", event)

    def _remember(self, event: EngineEvent) -> None:
        history = self._history.setdefault(event.job_id, [])
        if isinstance(event, Progress) and history and isinstance(history[-1], Progress):
            history[-1] = event  # replay needs the latest progress, not every step
        else:
            history.append(event)
        if isinstance(event, TERMINAL_EVENTS):
            self._finished[event.job_id] = self._history.pop(event.job_id)
            while len(self._finished) > self._history_jobs:
                self._finished.popitem(last=False)

    async def _feed(self, listener: Listener, queue: asyncio.Queue[EngineEvent]) -> None:
        while True:
            event = await queue.get()
            try:
                result = listener(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("engine listener failed on %s", event)


def build_local_engine(
    settings: Any,
    *,
    config: EngineConfig | None = None,
    metrics: EngineMetrics | None = None,
) -> tuple[AsyncEngine, Any]:
    """The engine over local worker processes, for the app factory: returns (engine, executor).
    Start the executor (`executor.start()`) before `await engine.start()`; shut it down after stop."""
    from kiln.executor.local import LocalExecutor

    executor = LocalExecutor.from_settings(settings)
    if metrics is not None:
        metrics.watch_model_loads(executor.model_loads)
    core = EngineCore(executor, config or EngineConfig.from_settings(settings), metrics=metrics)
    return AsyncEngine(core), executor
