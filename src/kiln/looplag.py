"""Event-loop lag: a task that asks to wake every few milliseconds and records how late it woke.

Anything that holds the loop (a blocking database call, argon2, a long CPU burst) shows up as lag.
Lag also comes from outside the loop (a starved CPU, threads holding the GIL), so each tick also
records how much CPU the loop's own thread used since the last one ("busy"): the share of the lag
that the loop's callbacks caused. Exported on the `CollectorRegistry` it is given, never the global
one. It must never do work of its own on the loop beyond one sleep and one observation per tick.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Gauge, Histogram

LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""From "the loop is idle" (~1 ms, the selector's granularity) to "a request held it for seconds"."""


class LoopLagProbe:
    """`probe.start()` on the loop to watch (or `watching(loop)` from another thread); `max_lag_s`
    and the `kiln_event_loop_lag_seconds` histogram say how late its ticks came."""

    def __init__(self, registry: CollectorRegistry, interval_s: float = 0.005) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.interval_s = interval_s
        self.max_lag_s = 0.0
        """The largest lag seen since the probe started (or since `reset()`): wall-clock time."""
        self.max_busy_s = 0.0
        """The most CPU the loop's thread spent between two ticks (its callbacks, back to back)."""
        self.ticks = 0
        self.first_tick = threading.Event()
        """Set once the probe has woken once: it is running on its loop (usable from any thread)."""
        self._lag = Histogram(
            "kiln_event_loop_lag_seconds",
            "How late the event loop woke a task that slept interval_s: time it was held by others.",
            buckets=LAG_BUCKETS_S,
            registry=registry,
        )
        self._busy = Histogram(
            "kiln_event_loop_busy_seconds",
            "CPU time the event loop's thread spent between two ticks of the lag probe.",
            buckets=LAG_BUCKETS_S,
            registry=registry,
        )
        self._max = Gauge(
            "kiln_event_loop_lag_max_seconds",
            "The largest event-loop lag seen since the probe started.",
            registry=registry,
        )
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        """Start ticking on the running loop (call it from a coroutine on that loop)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="kiln-loop-lag")
        return self._task

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    def reset(self) -> None:
        """Forget the maximum (the histogram keeps counting, as Prometheus counters do)."""
        self.max_lag_s = self.max_busy_s = 0.0
        self._max.set(0.0)

    def observe(self, lag_s: float, busy_s: float = 0.0) -> None:
        lag_s, busy_s = max(0.0, lag_s), max(0.0, busy_s)
        self.ticks += 1
        self._lag.observe(lag_s)
        self._busy.observe(busy_s)
        self.max_busy_s = max(self.max_busy_s, busy_s)
        if lag_s > self.max_lag_s:
            self.max_lag_s = lag_s
            self._max.set(lag_s)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        cpu_s = time.thread_time()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            now_cpu_s = time.thread_time()  # this thread's CPU only: not the GIL wait, not a starved core
            self.observe(loop.time() - due, now_cpu_s - cpu_s)
            cpu_s = now_cpu_s
            self.first_tick.set()


@contextmanager
def watching(
    loop: asyncio.AbstractEventLoop,
    registry: CollectorRegistry | None = None,
    interval_s: float = 0.005,
    timeout_s: float = 10.0,
) -> Iterator[LoopLagProbe]:
    """A probe on another thread's running loop (e.g. a test server's) for the `with` block.

    Returns once the probe has ticked, so the block measures from its first line."""
    probe = LoopLagProbe(registry or CollectorRegistry(), interval_s)

    async def start() -> None:
        probe.start()

    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout_s)
    if not probe.first_tick.wait(timeout_s):
        raise TimeoutError(f"the loop-lag probe did not tick within {timeout_s} s: is the loop held?")
    try:
        yield probe
    finally:
        asyncio.run_coroutine_threadsafe(probe.stop(), loop).result(timeout_s)
