"""The scheduler process: the engine, its executor and workers, job transitions and leases, behind
the channel that API processes connect to. `kiln serve --role scheduler` runs `run_scheduler`;
tests run a `SchedulerHost` on a thread of their own beside the API.

Under `--role scheduler` a process runs only while it holds the scheduler leadership
(`leadership`): a second one stands by — no engine, no workers, a heartbeat saying "standby" — and
takes over within a second or two of the active one's death, adopting every unfinished job at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from urllib.parse import urlparse

from prometheus_client import CollectorRegistry, generate_latest

from kiln.config import Settings
from kiln.db.engine import make_engine, make_session_factory
from kiln.engine import EngineMetrics, build_local_engine
from kiln.service.channel import SchedulerServer
from kiln.service.leadership import Leadership, leadership_for
from kiln.service.job_streams import job_stream_writer
from kiln.service.messages import Status
from kiln.service.plan_cache import PlanCache
from kiln.service.plans import ensure_plans
from kiln.service.scheduler import Scheduler
from kiln.service.storage import make_image_store
from kiln.service.thermal import ThermalGuard
from kiln.service.webhooks_delivery import WebhookDeliverer

log = logging.getLogger(__name__)

METRICS_EVERY_S = 0.5
LEADER_CHECK_MIN_S = 3.0
"""The leader's re-check of its lock gets at least this long to answer before it counts as lost."""


def scheduler_id_of(settings: Settings) -> str:
    """The lease holder's name: stable across restarts of the scheduler of one address."""
    if settings.scheduler_id:
        return settings.scheduler_id
    port = urlparse(settings.scheduler_url.replace("tcp://", "http://", 1)).port or 0
    return f"scheduler-{socket.gethostname()}-{port}"[:64]


class SchedulerHost:
    """`exclusive`: this process holds the scheduler leadership, so it adopts every unfinished job
    held by another scheduler at once (see `Scheduler.exclusive`)."""

    def __init__(self, settings: Settings, *, exclusive: bool = False) -> None:
        self.settings = settings
        self.db_engine = make_engine(settings.database_url)
        self.db = make_session_factory(self.db_engine)
        self.store = make_image_store(settings)
        self.metrics_registry = CollectorRegistry()
        self.metrics = EngineMetrics(self.metrics_registry, admission=False)
        self.engine, self.executor = build_local_engine(settings, metrics=self.metrics)
        self.scheduler = Scheduler(
            self.db, self.store, PlanCache(self.db, settings.live_settings_poll_s), self.engine, self.executor,
            scheduler_id=scheduler_id_of(settings), lease_s=settings.job_lease_s, exclusive=exclusive,
            streams=job_stream_writer(settings),
        )
        self.server = SchedulerServer(self.scheduler, settings.scheduler_url, settings.scheduler_events_url,
                                      status=self._status)
        self.scheduler.publish = self.server.publish
        self.webhooks = WebhookDeliverer.of(settings, self.db, self.metrics_registry)
        self.scheduler.webhooks_written = self.webhooks.wake
        self.thermal = ThermalGuard.from_settings(settings, self.engine, self.db, self.metrics_registry)
        self.started_at = time.time()
        self._metrics = b""
        self._metrics_at = float("-inf")

    async def start(self) -> None:
        await asyncio.to_thread(ensure_plans, self.db, self.settings.plans)
        await self.server.start()  # bind first: API processes learn it is there from its heartbeat
        await self.scheduler.start()
        await asyncio.to_thread(self.webhooks.start)
        await self.thermal.start()

    async def stop(self) -> None:
        try:
            await self.thermal.stop()
            await self.scheduler.stop()
        finally:
            await asyncio.to_thread(self.webhooks.stop)
            await self.server.stop()
            self.db_engine.dispose()

    def _status(self) -> Status:
        now = time.monotonic()
        if now - self._metrics_at >= METRICS_EVERY_S:
            self._metrics, self._metrics_at = generate_latest(self.metrics_registry), now
        core = self.engine.core
        return Status(
            scheduler_id=self.scheduler.scheduler_id, started_at=self.started_at,
            workers=self.scheduler.workers, sent_at=time.time(), metrics=self._metrics,
            stats={"queued": len(core.queue), "workers_ready": self._ready_workers(),
                   "running_batches": len(core.running), "jobs": self.scheduler.jobs_held(),
                   "images_per_s": round(core.throughput.images_per_s, 3),
                   "thermal": self.thermal.snapshot()},
        )

    def _ready_workers(self) -> int:
        """Workers with their models loaded (`workers` counts those still loading too)."""
        ready = getattr(self.executor, "ready_slots", None)
        return int(ready()) if ready is not None else self.scheduler.workers

    # ---- on a thread of its own (tests)

    def start_in_thread(self, timeout_s: float = 60.0) -> None:
        started = threading.Event()
        self._stop_requested: asyncio.Event | None = None
        self._error: BaseException | None = None

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop_requested = asyncio.Event()
            try:
                await self.start()
            except BaseException as exc:
                self._error = exc
                started.set()
                raise
            started.set()
            await self._stop_requested.wait()
            await self.stop()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), name="kiln-scheduler", daemon=True)
        self._thread.start()
        if not started.wait(timeout_s):
            raise RuntimeError("the scheduler did not start")
        if self._error is not None:
            raise RuntimeError(f"the scheduler failed to start: {self._error!r}")

    def call(self, coro, timeout_s: float = 30.0):  # type: ignore[no-untyped-def]
        """Run a coroutine on the scheduler's loop (tests)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def stop_thread(self, timeout_s: float = 30.0) -> None:
        if self._stop_requested is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop_requested.set)
            self._thread.join(timeout_s)


def run_scheduler(settings: Settings, parent_pid: int | None = None, *, elect: bool = False) -> None:
    """Run the scheduler until SIGTERM or SIGINT (or, with `parent_pid`, until that process is gone:
    `kiln serve`'s API process killed with -9); unfinished jobs stay queued for the next one. With
    `elect` (`--role scheduler`), only while this process holds the scheduler leadership: it stands
    by until it can take it, and steps down (back to standing by) if it ever cannot prove it holds it."""

    async def watch_parent(stop: asyncio.Event) -> None:
        while os.getppid() == parent_pid:
            await asyncio.sleep(1.0)
        log.warning("the API process that started this scheduler is gone; stopping")
        stop.set()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        watcher = asyncio.create_task(watch_parent(stop)) if parent_pid is not None else None
        try:
            if elect:
                await _lead_or_stand_by(settings, stop, leadership_for(settings))
            else:
                await _run_host(SchedulerHost(settings), settings, stop)
        finally:
            if watcher is not None:
                watcher.cancel()

    asyncio.run(main())


async def _run_host(host: SchedulerHost, settings: Settings, stop: asyncio.Event,
                    leadership: Leadership | None = None) -> None:
    """Run `host` until `stop` (or until `leadership` can no longer be proven)."""
    await host.start()
    log.info("scheduler %s %slistening on %s, events on %s", host.scheduler.scheduler_id,
             "active, " if leadership is not None else "", settings.scheduler_url, settings.scheduler_events_url)
    lost = False
    try:
        if leadership is None:
            await stop.wait()
            return
        while not await _wait(stop, settings.scheduler_standby_poll_s):
            if not await _still_leads(leadership, settings.scheduler_standby_poll_s):
                lost = True
                log.error("scheduler %s lost the leadership; stepping down", host.scheduler.scheduler_id)
                return
    finally:
        try:
            await host.stop()
        except Exception:
            if not lost:
                raise
            log.exception("stopping after the leadership was lost failed")  # the database may be away too


async def _still_leads(leadership: Leadership, poll_s: float) -> bool:
    """The re-check, with a deadline: a check that cannot answer (a partitioned network) is a loss,
    so an old leader stops within seconds of the point where a standby may take over."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(leadership.held), max(LEADER_CHECK_MIN_S, 3 * poll_s))
    except TimeoutError:
        return False


async def _lead_or_stand_by(settings: Settings, stop: asyncio.Event, leadership: Leadership) -> None:
    scheduler_id = scheduler_id_of(settings)
    try:
        while not stop.is_set():
            if not await asyncio.to_thread(leadership.try_acquire) and not await _stand_by(
                    settings, scheduler_id, stop, leadership):
                return  # stopped while standing by
            log.info("scheduler %s took the leadership", scheduler_id)
            await _run_host(SchedulerHost(settings, exclusive=True), settings, stop, leadership)
            await asyncio.to_thread(leadership.release)
    finally:
        await asyncio.to_thread(leadership.release)


async def _stand_by(settings: Settings, scheduler_id: str, stop: asyncio.Event, leadership: Leadership) -> bool:
    """Publish a "standby" heartbeat (no engine, no workers, requests not taken) until the
    leadership is this process's (True) or `stop` is set (False). The ROUTER is left unbound: what API processes
    send meanwhile waits in their DEALERs and arrives once this scheduler is active."""
    started_at = time.time()

    def status() -> Status:
        return Status(scheduler_id=scheduler_id, started_at=started_at, workers=0, sent_at=time.time(),
                      role="standby")

    beacon = SchedulerServer(None, settings.scheduler_url, settings.scheduler_events_url, status=status)
    await beacon.start(requests=False)
    log.info("scheduler %s standing by (events on %s)", scheduler_id, settings.scheduler_events_url)
    try:
        while not await _wait(stop, settings.scheduler_standby_poll_s):
            if await asyncio.to_thread(leadership.try_acquire):
                return True
        return False
    finally:
        await beacon.stop()


async def _wait(event: asyncio.Event, timeout_s: float) -> bool:
    """Whether `event` was set within `timeout_s`."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout_s)
    return event.is_set()
