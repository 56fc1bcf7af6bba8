"""The scheduler process: the engine, its executor and workers, job transitions and leases, behind
the channel that API processes connect to. `kiln serve --role scheduler` runs `run_scheduler`;
tests run a `SchedulerHost` on a thread of their own beside the API.
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
from kiln.service import content_credentials
from kiln.service.channel import SchedulerServer
from kiln.service.job_streams import job_stream_writer
from kiln.service.messages import Status
from kiln.service.plan_cache import PlanCache
from kiln.service.plans import ensure_plans
from kiln.service.scheduler import Scheduler
from kiln.service.storage import ImageStore

log = logging.getLogger(__name__)

METRICS_EVERY_S = 0.5


def scheduler_id_of(settings: Settings) -> str:
    """The lease holder's name: stable across restarts of the scheduler of one address."""
    if settings.scheduler_id:
        return settings.scheduler_id
    port = urlparse(settings.scheduler_url.replace("tcp://", "http://", 1)).port or 0
    return f"scheduler-{socket.gethostname()}-{port}"[:64]


class SchedulerHost:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db_engine = make_engine(settings.database_url)
        self.db = make_session_factory(self.db_engine)
        self.store = ImageStore(
            settings.images_dir,
            content_credentials.ContentCredentials(settings.data_dir / "c2pa")
            if content_credentials.available() else None,
        )
        self.metrics_registry = CollectorRegistry()
        self.metrics = EngineMetrics(self.metrics_registry, admission=False)
        self.engine, self.executor = build_local_engine(settings, metrics=self.metrics)
        self.scheduler = Scheduler(
            self.db, self.store, PlanCache(self.db, settings.live_settings_poll_s), self.engine, self.executor,
            scheduler_id=scheduler_id_of(settings), lease_s=settings.job_lease_s,
            streams=job_stream_writer(settings),
        )
        self.server = SchedulerServer(self.scheduler, settings.scheduler_url, settings.scheduler_events_url,
                                      status=self._status)
        self.scheduler.publish = self.server.publish
        self.started_at = time.time()
        self._metrics = b""
        self._metrics_at = float("-inf")

    async def start(self) -> None:
        await asyncio.to_thread(ensure_plans, self.db, self.settings.plans)
        await self.server.start()  # bind first: API processes learn it is there from its heartbeat
        await self.scheduler.start()

    async def stop(self) -> None:
        try:
            await self.scheduler.stop()
        finally:
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
            stats={"queued": len(core.queue),
                   "running_batches": len(core.running), "jobs": self.scheduler.jobs_held(),
                   "images_per_s": round(core.throughput.images_per_s, 3)},
        )

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


def run_scheduler(settings: Settings, parent_pid: int | None = None) -> None:
    """Run the scheduler until SIGTERM or SIGINT (or, with `parent_pid`, until that process is gone:
    `kiln serve`'s API process killed with -9); unfinished jobs stay queued for the next one."""

    async def watch_parent(stop: asyncio.Event) -> None:
        while os.getppid() == parent_pid:
            await asyncio.sleep(1.0)
        log.warning("the API process that started this scheduler is gone; stopping")
        stop.set()

    async def main() -> None:
        host = SchedulerHost(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        watcher = asyncio.create_task(watch_parent(stop)) if parent_pid is not None else None
        await host.start()
        log.info("scheduler %s listening on %s, events on %s", host.scheduler.scheduler_id,
                 settings.scheduler_url, settings.scheduler_events_url)
        try:
            await stop.wait()
        finally:
            if watcher is not None:
                watcher.cancel()
            await host.stop()

    asyncio.run(main())
