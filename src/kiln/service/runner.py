"""The seam between the HTTP API and whatever executes jobs.

Routes speak only to a `JobRunner`: `submit` a job admitted by `jobs.create_job`, `wait` for its
outcome, `cancel` it. `InlineJobRunner` runs jobs one at a time in this process (a thread per batch);
the engine replaces it with a scheduler-backed runner of the same protocol without touching routes.
A runner must end every job it starts through `complete_job`, `fail_job` or `cancel_job`, so the
quota ledger stays exact whatever happens in the pipeline.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from kiln.db.models import utcnow
from kiln.service import jobs
from kiln.service.storage import ImageStore
from kiln.worker.registry import ModelRegistry
from kiln.worker.requests import BatchSpec, GenerationRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobOutcome:
    job_id: str
    status: str
    """succeeded · failed · cancelled, or queued/running when `wait` timed out."""
    image_ids: tuple[str, ...] = ()
    error_code: str | None = None
    error_message: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in jobs.TERMINAL


def outcome_of(view: jobs.JobView) -> JobOutcome:
    return JobOutcome(view.id, view.status, view.image_ids, view.error_code, view.error_message)


class JobRunner(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def submit(self, job_id: str) -> None:
        """Hand over a job that `create_job` admitted (status queued, charge reserved)."""
        ...

    async def wait(self, job_id: str, timeout_s: float) -> JobOutcome:
        """The job's outcome once it is finished, or its current status after `timeout_s`."""
        ...

    async def cancel(self, job_id: str) -> None:
        """Stop a job's work (the caller has already cancelled and refunded it via `cancel_job`)."""
        ...


def is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def batch_of(job: jobs.JobView, store: ImageStore) -> tuple[BatchSpec, GenerationRequest]:
    """The worker's view of one job: the batch key's values and the request itself."""
    inputs = job.params.get("inputs") or {}
    spec = BatchSpec(
        model=job.model, width=job.width, height=job.height, steps=job.steps,
        guidance_scale=job.guidance_scale, task=job.params.get("task", "generate"),
    )
    request = GenerationRequest(
        request_id=job.id, prompt=job.prompt, seed=job.seed, n=job.n,
        init_image=store.read(inputs["image"]) if "image" in inputs else None,
        mask_image=store.read(inputs["mask"]) if "mask" in inputs else None,
        strength=float(job.params.get("strength", 0.75)),
    )
    return spec, request


class InlineJobRunner:
    """An asyncio queue drained by `concurrency` tasks, each running one job's batch in a thread.

    Jobs it holds are leased to it in the database and renewed every `lease_s / 3`; at start and on
    each renewal it reaps jobs whose holder stopped renewing (a killed server), refunding them.
    """

    def __init__(
        self,
        db: sessionmaker[Session],
        registry: ModelRegistry,
        store: ImageStore,
        *,
        concurrency: int = 1,
        poll_s: float = 0.25,
        lease_s: float = 30.0,
    ) -> None:
        self._db = db
        self._registry = registry
        self._store = store
        self._concurrency = concurrency
        self._poll_s = poll_s
        self._queue: asyncio.Queue[str] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._done: dict[str, asyncio.Event] = {}
        self._cancelled: set[str] = set()
        self._running: set[str] = set()
        self._lease_s = lease_s
        self.worker_id = f"inline-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"[:64]

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        await asyncio.to_thread(jobs.reap_abandoned, self._db, utcnow())
        self._tasks = [asyncio.create_task(self._work(), name=f"kiln-runner-{i}")
                       for i in range(self._concurrency)]
        self._tasks.append(asyncio.create_task(self._keep_leases(), name="kiln-runner-leases"))

    def _lease_until(self) -> dt.datetime:
        return utcnow() + dt.timedelta(seconds=self._lease_s)

    async def _keep_leases(self) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                await asyncio.to_thread(jobs.renew_leases, self._db, self.worker_id, self._lease_until())
                await asyncio.to_thread(jobs.reap_abandoned, self._db, utcnow())
            except Exception:  # noqa: BLE001 - a database hiccup must not end the renewals
                log.exception("renewing job leases failed")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        # Jobs this process admitted but never started would keep their charge reserved: refund them.
        while self._queue is not None and not self._queue.empty():
            job_id = self._queue.get_nowait()
            await asyncio.to_thread(jobs.cancel_job, self._db, job_id, None)
            event = self._done.pop(job_id, None)
            if event is not None:
                event.set()

    async def submit(self, job_id: str) -> None:
        if self._queue is None:
            raise RuntimeError("the job runner is not started")
        self._done.setdefault(job_id, asyncio.Event())
        await asyncio.to_thread(jobs.lease_jobs, self._db, [job_id], self.worker_id, self._lease_until())
        self._queue.put_nowait(job_id)

    async def cancel(self, job_id: str) -> None:
        self._cancelled.add(job_id)

    async def wait(self, job_id: str, timeout_s: float) -> JobOutcome:
        deadline = time.monotonic() + timeout_s
        while True:
            view = await asyncio.to_thread(jobs.get_job, self._db, job_id)
            remaining = deadline - time.monotonic()
            if view.terminal or remaining <= 0:
                return outcome_of(view)
            event = self._done.get(job_id)
            # A job of this process wakes us by event; one run by another process is polled for.
            pause = min(remaining, self._poll_s if event is None else max(self._poll_s, 5.0))
            try:
                if event is None:
                    await asyncio.sleep(pause)
                else:
                    await asyncio.wait_for(event.wait(), pause)
            except TimeoutError:
                pass

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            job_id = await self._queue.get()
            try:
                await self._run(job_id)
            except Exception:  # noqa: BLE001 - one job's trouble must not stop the runner
                log.exception("job %s: runner error", job_id)
            finally:
                self._cancelled.discard(job_id)
                event = self._done.pop(job_id, None)
                if event is not None:
                    event.set()

    async def _run(self, job_id: str) -> None:
        from kiln.worker.runner import Cancelled, run_batch

        job = await asyncio.to_thread(jobs.mark_running, self._db, job_id)
        if job is None:  # cancelled while queued, or claimed elsewhere
            return
        self._running.add(job_id)
        try:
            spec, request = batch_of(job, self._store)
            images = await asyncio.to_thread(
                run_batch, self._registry, spec, [request],
                should_cancel=lambda: job_id in self._cancelled,
            )
            await asyncio.to_thread(jobs.complete_job, self._db, self._store, job_id, images[job_id])
        except Cancelled:
            await asyncio.to_thread(jobs.cancel_job, self._db, job_id, None)
        except asyncio.CancelledError:
            # Shutting down mid-job: end it here, refunded, rather than leave its charge reserved.
            jobs.cancel_job(self._db, job_id, None)
            raise
        except Exception as exc:  # noqa: BLE001 - torch.OutOfMemoryError included
            code = "out_of_memory" if is_out_of_memory(exc) else "generation_failed"
            log.warning("job %s failed: %s: %s", job_id, type(exc).__name__, exc)
            await asyncio.to_thread(
                jobs.fail_job, self._db, job_id, code, f"Image generation failed ({type(exc).__name__})."
            )
        finally:
            self._running.discard(job_id)
