"""`kiln serve`: the API (with the web UI) and the scheduler (engine, executor, workers) as separate
processes — both by default, or one side with `--role api` / `--role scheduler`. Of several
`--role scheduler` processes on one database, one is active and the others stand by."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from enum import Enum
from typing import Annotated, Any

import typer

GRACEFUL_SHUTDOWN_S = 10
RESTART_BACKOFF_S = 1.0

log = logging.getLogger("kiln.serve")


class Role(str, Enum):
    all = "all"
    api = "api"
    scheduler = "scheduler"


def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port (default 8000).")] = None,
    role: Annotated[Role, typer.Option(
        help="all: API + scheduler processes; api or scheduler: one side (of several schedulers on "
             "one database, one is active, the others stand by).")]
    = Role.all,
) -> None:
    """Start Kiln: API + web UI, and the scheduler with its workers."""
    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = ctx.obj.settings(**overrides)
    ctx.obj.db()  # migrate before the first request
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    if role is Role.scheduler:
        from kiln.service.scheduler_host import run_scheduler

        run_scheduler(settings, elect=True)  # one active, any others stand by
        return
    supervisor = SchedulerSupervisor(settings) if role is Role.all else None
    if supervisor is not None:
        supervisor.start()
    try:
        _serve_api(settings)
    finally:
        if supervisor is not None:
            supervisor.stop()


def _serve_api(settings: Any) -> None:
    import uvicorn

    from kiln.app import create_app

    # Event streams and synchronous generations can outlive a shutdown by minutes: give them a few
    # seconds, then stop; unfinished jobs stay queued in the database for the scheduler.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)


def _scheduler_child(values: dict[str, Any], parent_pid: int) -> None:
    from kiln.config import Settings
    from kiln.service.scheduler_host import run_scheduler

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    run_scheduler(Settings(**values), parent_pid=parent_pid)


class SchedulerSupervisor:
    """Runs the scheduler in a child process and starts it again if it dies; the API process keeps
    answering meanwhile (503 with a Retry-After where it cannot promise, queued jobs kept)."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self._ctx = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-scheduler-supervisor", daemon=True)

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        # The values, not the object: settings read from a file are an unpicklable subclass.
        self._process = self._ctx.Process(target=_scheduler_child, name="kiln-scheduler",
                                          args=(self.settings.model_dump(), os.getpid()))
        self._process.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._process.join(0.5)
            if self._process.exitcode is None or self._stopping.is_set():
                continue
            log.error("the scheduler process exited (code %s); starting it again", self._process.exitcode)
            if self._stopping.wait(RESTART_BACKOFF_S):
                return
            self._spawn()

    def stop(self) -> None:
        self._stopping.set()
        if self._process is not None and self._process.is_alive():
            self._process.terminate()  # SIGTERM: the scheduler hands its unfinished jobs back
            self._process.join(30)
            if self._process.is_alive():
                self._process.kill()
        self._thread.join(5)
