"""The async driver: runs `EngineCore.step()` in an asyncio task and routes its events to listeners
(the scheduler's job writer). It keeps no per-job history: the API process's job log is the only one.
All engine calls happen on the event loop's thread, so the core needs no lock; the executor wakes the
loop from its own thread when outputs land.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.metrics import EngineMetrics
from kiln.engine.types import Admitted, EngineEvent, EngineRequest

log = logging.getLogger(__name__)

Listener = Callable[[EngineEvent], Awaitable[None] | None]


class AsyncEngine:
    """`start()` → `admit()`/`add_request()`/`cancel()` → events → `stop()`."""

    def __init__(self, core: EngineCore, *, idle_poll_s: float = 0.5) -> None:
        self.core = core
        self.idle_poll_s = idle_poll_s
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
        self._poke()
        return added

    def cancel(self, job_id: str, user_id: str | None = None) -> bool:
        cancelled = self.core.cancel(job_id, user_id)
        self._poke()
        return cancelled

    def update_plan(self, plan: str, **changes: Any) -> None:
        self.core.update_plan(plan, **changes)
        self._poke()

    def wake(self) -> None:
        """Step soon: something outside the engine changed what can run (a worker's capacity)."""
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
            for listener, queue in self._listeners:
                if queue is not None:
                    queue.put_nowait(event)
                    continue
                try:
                    listener(event)
                except Exception:
                    log.exception("engine listener failed on %s", event)

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
    """The engine over the executor the settings name (local worker processes, or Ray actors), for
    the app factory: returns (engine, executor). Start the executor (`executor.start()`) before
    `await engine.start()`; shut it down after stop."""
    from kiln.executor import build_executor

    executor = build_executor(settings)
    if metrics is not None:
        metrics.watch_model_loads(executor.model_loads)
    core = EngineCore(executor, config or EngineConfig.from_settings(settings), metrics=metrics)
    if metrics is not None:
        metrics.watch_nodes(core, executor)
    return AsyncEngine(core), executor
