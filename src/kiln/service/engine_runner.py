"""EngineJobRunner: jobs admitted in the database run through the engine, and the engine's events
become job transitions (running, queued again, succeeded with stored images, failed or cancelled with
one refund) and numbered per-job events that SSE clients follow and resume.

It never decides who runs next (the engine does) and touches the ledger only through
`kiln.service.jobs`. Jobs it holds are leased to it in the database and renewed every third of the
lease; a job whose lease lapsed (its server died or stopped) is adopted by a live runner and run again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from kiln.db.models import utcnow
from kiln.engine import (
    Admitted,
    AsyncEngine,
    BatchKey,
    Cancelled,
    Completed,
    EngineEvent,
    EngineRequest,
    Failed,
    Position,
    Progress,
    Queued,
    Requeued,
    Started,
)
from kiln.service import jobs
from kiln.service.plan_cache import PlanCache
from kiln.service.plans import PlanLimits
from kiln.service.runner import JobEvent, JobOutcome, outcome_of, terminal_event
from kiln.service.storage import ImageStore

log = logging.getLogger(__name__)

@dataclass(eq=False)
class _JobLog:
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


def engine_request(
    job_id: str,
    user_id: str,
    plan: PlanLimits,
    job: jobs.JobSpec | jobs.JobView,
    *,
    attempts: int = 0,
    inputs: dict[str, bytes] | None = None,
) -> EngineRequest:
    """The engine's view of a job (or of a request about to become one): its batch key, the plan's
    weight and wait target, and the uploads of an edit."""
    inputs = inputs or {}
    params = job.params
    loras = tuple((str(name), float(scale)) for name, scale in params.get("loras", ()))  # JSON lists
    return EngineRequest(
        job_id=job_id, user_id=user_id, plan=plan.name,
        key=BatchKey(job.model, params.get("task", "generate"), job.width, job.height, job.steps,
                     job.guidance_scale, loras),
        prompt=job.prompt, seed=job.seed, n=job.n,
        init_image=inputs.get("image"), mask_image=inputs.get("mask"),
        strength=float(params.get("strength", 0.75)),
        weight=plan.priority_weight, wait_target_s=plan.wait_target_s, attempts=attempts,
        relax=getattr(job, "relax", False),
        preview_every=int(params.get("preview_every", 0)),
    )


def degradation_record(admitted: Admitted) -> dict[str, Any] | None:
    """What admission changed, as stored in the job's `degraded` column and shown in responses."""
    change = admitted.degraded
    if change is None:
        return None
    return {
        "steps_from": change.steps_from, "steps_to": change.steps_to,
        "size_from": f"{change.size_from[0]}x{change.size_from[1]}",
        "size_to": f"{change.size_to[0]}x{change.size_to[1]}",
        "expected_wait_s": round(admitted.expected_wait_s, 3),
    }


class EngineJobRunner:
    """The `JobRunner` over an `AsyncEngine` and its executor (started and stopped with it)."""

    def __init__(
        self,
        db: sessionmaker[Session],
        store: ImageStore,
        plans: PlanCache,
        engine: AsyncEngine,
        executor: Any,
        *,
        lease_s: float = 30.0,
        poll_s: float = 0.5,
        history_jobs: int = 2000,
    ) -> None:
        self.db = db
        self.store = store
        self.plans = plans
        self.engine = engine
        self.executor = executor
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.worker_id = f"engine-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"[:64]
        self._logs: dict[str, _JobLog] = {}
        self._finished: OrderedDict[str, _JobLog] = OrderedDict()
        self._history_jobs = history_jobs
        self._pending: dict[str, deque[EngineEvent]] = {}
        self._handlers: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        engine.add_listener(self._on_engine_event)

    # ---- lifecycle

    async def start(self) -> None:
        await asyncio.to_thread(self.executor.start)
        await self.engine.start()
        await self._adopt()  # jobs a stopped or dead server left behind run here, with their attempts
        self._tasks.append(asyncio.create_task(self._keep_leases(), name="kiln-runner-leases"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.engine.stop()
        await asyncio.to_thread(self.executor.shutdown)
        await asyncio.gather(*self._handlers.values(), return_exceptions=True)  # writes under way
        # What is left unfinished stays charged and queued: the next server to start runs it.
        await asyncio.to_thread(jobs.release_leases, self.db, self.worker_id, utcnow())

    # ---- the JobRunner interface

    @contextlib.contextmanager
    def admitting(self, user_id: str, plan: PlanLimits, spec: jobs.JobSpec) -> Iterator[Admitted]:
        """The engine's admission for a request about to become a job: maybe degraded; raises
        Overloaded (503) beyond the plan's wait target. Reads counters only: milliseconds. Until the
        block ends (create and submit the job inside it) its work counts as queued, so a flood
        arriving at once is judged as the queue it will be, not as the empty queue it was."""
        admitted = self.engine.admit(engine_request("admission", user_id, plan, spec))
        self.engine.hold(admitted.request)
        try:
            yield admitted
        finally:
            self.engine.unhold(admitted.request)

    async def submit(self, job_id: str) -> None:
        await asyncio.to_thread(jobs.lease_jobs, self.db, [job_id], self.worker_id, self._lease_until())
        await self._enqueue(await asyncio.to_thread(jobs.get_job, self.db, job_id))

    async def cancel(self, job_id: str) -> None:
        self.engine.cancel(job_id)

    async def wait(self, job_id: str, timeout_s: float) -> JobOutcome:
        deadline = time.monotonic() + timeout_s
        while True:
            view = await asyncio.to_thread(jobs.get_job, self.db, job_id)
            remaining = deadline - time.monotonic()
            if view.terminal or remaining <= 0:
                return outcome_of(view)
            job_log = self._logs.get(job_id)
            try:
                if job_log is None:  # run by another server: poll the database
                    await asyncio.sleep(min(remaining, self.poll_s))
                else:
                    await asyncio.wait_for(job_log.done.wait(), remaining)
            except TimeoutError:
                pass

    def position(self, job_id: str) -> tuple[int | None, float | None]:
        """Queued jobs ahead of this one and the expected seconds until it starts (None: not here)."""
        eta = self.engine.eta_s(job_id)
        return self.engine.queue_position(job_id), None if eta is None else round(eta, 3)

    def active_jobs(self, user_id: str) -> int:
        return sum(1 for job_log in self._logs.values() if job_log.user_id == user_id)

    async def events(self, job_id: str, after: int = 0) -> AsyncIterator[JobEvent]:
        """The job's events with ids above `after`: replayed, then live, ending with the terminal one.
        A job this runner does not hold is followed in the database."""
        job_log = self._logs.get(job_id) or self._finished.get(job_id)
        if job_log is None:
            async for event in self._events_from_db(job_id, after):
                yield event
            return
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        job_log.subscribers.append(queue)
        try:
            for event in list(job_log.events):
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
            job_log.subscribers.remove(queue)

    def last_event_id(self, job_id: str) -> int | None:
        """The id of a finished job's terminal event, if this runner remembers it."""
        job_log = self._finished.get(job_id)
        return None if job_log is None else job_log.next_id - 1

    # ---- into the engine

    def _lease_until(self) -> dt.datetime:
        return utcnow() + dt.timedelta(seconds=self.lease_s)

    async def _enqueue(self, view: jobs.JobView) -> None:
        if view.terminal or view.id in self._logs:
            return
        self._logs[view.id] = _JobLog(view.user_id)  # before any await: a second submit is a no-op
        try:
            plan = await asyncio.to_thread(self.plans.get, view.plan_name)
            inputs = await asyncio.to_thread(self._inputs, view)
            request = engine_request(view.id, view.user_id, plan, view, attempts=view.attempts, inputs=inputs)
            added = self.engine.add_request(request)
        except BaseException:
            self._logs.pop(view.id, None)
            raise
        if not added:  # this engine already finished it
            self._logs.pop(view.id, None)

    def _inputs(self, view: jobs.JobView) -> dict[str, bytes]:
        paths = view.params.get("inputs") or {}
        return {name: self.store.read(path) for name, path in paths.items()}

    async def _adopt(self) -> None:
        adopted = await asyncio.to_thread(
            jobs.adopt_orphans, self.db, self.worker_id, self._lease_until(), utcnow(), self.lease_s
        )
        if adopted:
            log.info("adopted %d unfinished job(s) from the database", len(adopted))
        for view in adopted:
            await self._enqueue(view)

    async def _keep_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await asyncio.to_thread(jobs.renew_leases, self.db, self.worker_id, self._lease_until())
                for job_id in await asyncio.to_thread(jobs.finished_among, self.db, list(self._logs)):
                    self.engine.cancel(job_id)  # cancelled through another server
                await self._adopt()
            except Exception:  # noqa: BLE001 - a database hiccup must not end the renewals
                log.exception("renewing job leases failed")

    # ---- out of the engine: one task per job with events to handle, so a job's events stay in
    # order while a slow write for one job (storing images) never holds up another's

    def _on_engine_event(self, event: EngineEvent) -> None:
        self._pending.setdefault(event.job_id, deque()).append(event)
        if event.job_id not in self._handlers:
            self._handlers[event.job_id] = asyncio.create_task(self._handle(event.job_id))

    async def _handle(self, job_id: str) -> None:
        queue = self._pending[job_id]
        try:
            while queue:
                event = queue.popleft()
                try:
                    await self._apply(event)
                except Exception:  # noqa: BLE001 - one job's trouble must not stop the others
                    log.exception("job %s: handling %s failed", job_id, type(event).__name__)
        finally:
            del self._handlers[job_id]
            if not queue:
                self._pending.pop(job_id, None)

    async def _apply(self, event: EngineEvent) -> None:
        job_id = event.job_id
        job_log = self._logs.get(job_id)
        if job_log is None:
            return
        if isinstance(event, Queued | Position):
            job_log.publish("queued" if isinstance(event, Queued) else "position",
                            {"queue_position": event.position, "eta_s": round(event.eta_s, 3)})
        elif isinstance(event, Started):
            if await asyncio.to_thread(jobs.mark_running, self.db, job_id, event.attempt) is None:
                self.engine.cancel(job_id)  # cancelled (or finished) in the database meanwhile
                return
            job_log.publish("started", {"attempt": event.attempt})
        elif isinstance(event, Progress):
            data: dict[str, Any] = {"step": event.step, "total": event.total}
            if event.preview_png:
                data["preview"] = base64.b64encode(event.preview_png).decode()
            job_log.publish("progress", data)
        elif isinstance(event, Requeued):
            await asyncio.to_thread(jobs.requeue_job, self.db, job_id)
            job_log.publish("requeued", {"reason": event.reason})
        elif isinstance(event, Completed):
            await asyncio.to_thread(jobs.complete_job, self.db, self.store, job_id, list(event.images))
            await self._finish(job_id, job_log)
        elif isinstance(event, Failed):
            log.warning("job %s failed: %s: %s", job_id, event.code, event.message)
            await asyncio.to_thread(
                jobs.fail_job, self.db, job_id, event.code,
                f"The image could not be generated ({event.code}); your quota was refunded.",
            )
            await self._finish(job_id, job_log)
        elif isinstance(event, Cancelled):
            await asyncio.to_thread(jobs.cancel_job, self.db, job_id, None)
            await self._finish(job_id, job_log)

    async def _finish(self, job_id: str, job_log: _JobLog) -> None:
        """The terminal event says what the database holds (a cancel may have won over a completion)."""
        view = await asyncio.to_thread(jobs.get_job, self.db, job_id)
        job_log.publish(*terminal_event(view))
        self._logs.pop(job_id, None)
        self._finished[job_id] = job_log
        while len(self._finished) > self._history_jobs:
            self._finished.popitem(last=False)

    async def _events_from_db(self, job_id: str, after: int) -> AsyncIterator[JobEvent]:
        seen: str | None = None
        next_id = after + 1
        while True:
            view = await asyncio.to_thread(jobs.get_job, self.db, job_id)
            if view.terminal:
                name, data = terminal_event(view)
                yield JobEvent(next_id, name, data)
                return
            if view.status != seen:
                seen = view.status
                if after == 0 or seen == "running":
                    yield JobEvent(next_id, "queued" if seen == "queued" else "started",
                                   {"attempt": view.attempts} if seen == "running" else {})
                    next_id += 1
            await asyncio.sleep(self.poll_s)

