"""The scheduler process's service: jobs that API processes admitted run through the engine, and the
engine's events become job transitions (running, queued again, succeeded with stored images, failed or
cancelled with one refund) published to every API process as `JobUpdate`s.

It never decides who runs next (the engine does), never speaks HTTP, and touches the ledger only
through `kiln.service.jobs`. Jobs are leased to it in the database (API processes write the lease in
the admission itself); it renews them every third of the lease and adopts jobs whose lease lapsed.
With Redis, it is also the one writer of every job's event stream (`streams`), which any replica
follows.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from sqlalchemy.orm import Session, sessionmaker

from kiln.db.models import utcnow
from kiln.engine import (
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
from kiln.errors import Overloaded
from kiln.service import job_leases, jobs, webhooks_outbox
from kiln.service.job_events import terminal_event
from kiln.service.job_streams import JobStreamWriter
from kiln.service.messages import Admit, AdmitReply, JobUpdate, Ticket
from kiln.service.plan_cache import PlanCache
from kiln.service.storage import ImageStore

log = logging.getLogger(__name__)

HOLD_S = 10.0
"""An admission whose job never arrives stops counting as queued work after this long."""

Publish = Callable[[msgspec.Struct], None]


class _Starts:
    """Group commit for job starts: the jobs of a batch start in the same moment, so their
    `queued → running` transitions share one transaction. Each caller awaits its own answer."""

    def __init__(self, db: sessionmaker[Session]) -> None:
        self.db = db
        self._pending: dict[str, tuple[int, asyncio.Future[bool]]] = {}
        self._scheduled = False

    async def claim(self, job_id: str, attempt: int) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending[job_id] = (attempt, future)
        if not self._scheduled:  # flush after the other starts of this loop iteration joined in
            self._scheduled = True
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._flush()))
        return await future

    async def _flush(self) -> None:
        pending, self._pending, self._scheduled = self._pending, {}, False
        try:
            claimed = await asyncio.to_thread(
                jobs.mark_running_many, self.db, {job_id: attempt for job_id, (attempt, _) in pending.items()})
        except Exception as exc:  # noqa: BLE001 - each waiting start hears of it
            for _, future in pending.values():
                if not future.done():
                    future.set_exception(exc)
            return
        for job_id, (_, future) in pending.items():
            if not future.done():
                future.set_result(job_id in claimed)


@dataclass
class _Held:
    request: EngineRequest
    until: float


class Scheduler:
    """Runs admitted jobs; `publish` sends each job update to the API processes."""

    def __init__(
        self,
        db: sessionmaker[Session],
        store: ImageStore,
        plans: PlanCache,
        engine: AsyncEngine,
        executor: Any,
        *,
        scheduler_id: str,
        lease_s: float = 30.0,
        publish: Publish | None = None,
        exclusive: bool = False,
        streams: JobStreamWriter | None = None,
    ) -> None:
        self.db = db
        self.store = store
        self.plans = plans
        self.engine = engine
        self.executor = executor
        self.scheduler_id = scheduler_id
        self.lease_s = lease_s
        self.publish: Publish = publish or (lambda _message: None)
        self.exclusive = exclusive
        """It holds the scheduler leadership: no other scheduler runs, so it adopts every unfinished
        job held by another at once, live lease or not (a job's Submit lost with a killed leader)."""
        self.streams = streams
        """Where every job update is also appended for the replicas (None: no Redis)."""
        self._tickets: dict[str, Ticket] = {}
        self._held: dict[str, _Held] = {}
        self._pending: dict[str, deque[EngineEvent]] = {}
        self._handlers: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._starts = _Starts(db)
        self._progress_at: dict[str, float] = {}
        self.webhooks_written: Callable[[], None] = lambda: None
        """Called after a transition of a job with a webhook (the deliverer looks at once)."""
        engine.add_listener(self._on_engine_event)

    # ---- lifecycle

    async def start(self) -> None:
        if self.streams is not None:
            await self.streams.start()
        await asyncio.to_thread(self.executor.start)
        await self.engine.start()
        # Jobs leased to this scheduler's id are from its previous life (nothing of them runs now).
        await self._adopt(own=True)
        self._tasks.append(asyncio.create_task(self._keep_leases(), name="kiln-scheduler-leases"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.engine.stop()
        await asyncio.to_thread(self.executor.shutdown)
        await asyncio.gather(*self._handlers.values(), return_exceptions=True)  # writes under way
        # What is left unfinished stays charged and queued: the next scheduler to start runs it.
        await asyncio.to_thread(job_leases.release_leases, self.db, self.scheduler_id)
        if self.streams is not None:
            await self.streams.stop()  # after the last writes: their events are written too

    @property
    def workers(self) -> int:
        return int(self.executor.total_slots())

    def jobs_held(self) -> int:
        return len(self._tickets)

    # ---- what API processes ask (called on this process's event loop by the channel)

    def admit(self, message: Admit) -> AdmitReply:
        """The engine's admission for a request about to become a job; reads counters only."""
        self._expire_holds()
        request = EngineRequest(
            job_id=message.hold_id, user_id=message.user_id, plan=message.plan,
            key=BatchKey(message.model, message.task, message.width, message.height, message.steps,
                         message.guidance_scale, tuple(message.loras)),
            prompt="", seed=0, n=message.n, weight=message.weight, wait_target_s=message.wait_target_s,
            relax=message.relax,
        )
        try:
            admitted = self.engine.admit(request)
        except Overloaded as exc:
            return AdmitReply(message.req_id, False, retry_after_s=exc.retry_after_s, message=exc.message)
        position = self.engine.position_guess(admitted.request)
        self.engine.hold(admitted.request)
        self._held[message.hold_id] = _Held(admitted.request, time.monotonic() + HOLD_S)
        key = admitted.request.key
        return AdmitReply(message.req_id, True, expected_wait_s=admitted.expected_wait_s, position=position,
                          steps=key.steps, width=key.width, height=key.height)

    def release(self, hold_id: str) -> None:
        held = self._held.pop(hold_id, None)
        if held is not None:
            self.engine.unhold(held.request)

    async def submit(self, ticket: Ticket, hold_id: str = "") -> None:
        if hold_id not in self._held:  # admitted while no scheduler answered (its row is not leased
            # yet) or through another scheduler (a leader since gone): lease it here, if unfinished
            until = utcnow() + dt.timedelta(seconds=self.lease_s)
            if not await asyncio.to_thread(job_leases.lease_jobs, self.db, [ticket.job_id], self.scheduler_id,
                                           until):
                self.release(hold_id)
                return
        try:
            await self._enqueue(ticket)
        finally:  # the hold counts until the job itself is queued: no gap for admissions to slip in
            self.release(hold_id)

    def cancel(self, job_id: str) -> None:
        self.engine.cancel(job_id)

    def _expire_holds(self) -> None:
        now = time.monotonic()
        for hold_id in [h for h, held in self._held.items() if held.until < now]:
            self.release(hold_id)

    # ---- into the engine

    async def _enqueue(self, ticket: Ticket) -> None:
        if ticket.job_id in self._tickets:
            return
        self._tickets[ticket.job_id] = ticket  # before any await: a second submit is a no-op
        try:
            plan = await asyncio.to_thread(self.plans.get, ticket.plan)
            paths = ticket.params.get("inputs") or {}
            inputs = await asyncio.to_thread(lambda: {n: self.store.read(p) for n, p in paths.items()})
            request = EngineRequest(
                job_id=ticket.job_id, user_id=ticket.user_id, plan=plan.name,
                key=BatchKey(ticket.model, ticket.task, ticket.width, ticket.height, ticket.steps,
                             ticket.guidance_scale, jobs.loras_of(ticket.params)),
                prompt=ticket.prompt, seed=ticket.seed, n=ticket.n,
                init_image=inputs.get("image"), mask_image=inputs.get("mask"),
                strength=float(ticket.params.get("strength", 0.75)),
                weight=plan.priority_weight, wait_target_s=plan.wait_target_s, attempts=ticket.attempts,
                relax=ticket.relax, preview_every=int(ticket.params.get("preview_every", 0)),
            )
            added = self.engine.add_request(request)
        except BaseException:
            self._tickets.pop(ticket.job_id, None)
            raise
        if not added:  # this engine already finished it
            self._tickets.pop(ticket.job_id, None)

    async def _adopt(self, own: bool = False) -> None:
        adopted = await asyncio.to_thread(
            job_leases.adopt_orphans, self.db, self.scheduler_id, self.lease_s, own=own, force=self.exclusive,
        )
        if adopted:
            log.info("adopted %d unfinished job(s) from the database", len(adopted))
        for view in adopted:
            await self._enqueue(Ticket.of(view))

    async def _keep_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await asyncio.to_thread(job_leases.renew_leases, self.db, self.scheduler_id, self.lease_s)
                for job_id in await asyncio.to_thread(jobs.finished_among, self.db, list(self._tickets)):
                    self.engine.cancel(job_id)  # cancelled through an API process while we missed it
                await self._adopt()
            except Exception:
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
                except Exception:
                    log.exception("job %s: handling %s failed", job_id, type(event).__name__)
        finally:
            del self._handlers[job_id]
            if not queue:
                self._pending.pop(job_id, None)

    def _update(self, ticket: Ticket, name: str, data: dict[str, Any], view: jobs.JobView | None = None) -> None:
        charge = {} if view is None else {"charge_state": view.charge_state, "charge_units": view.charge_units}
        update = JobUpdate(ticket.job_id, ticket.user_id, name, data, **charge)
        if self.streams is not None:
            self.streams.append(update)
        self.publish(update)

    async def _apply(self, event: EngineEvent) -> None:
        job_id = event.job_id
        ticket = self._tickets.get(job_id)
        if ticket is None:
            return
        if isinstance(event, Queued | Position):
            self._update(ticket, "queued" if isinstance(event, Queued) else "position",
                         {"queue_position": event.position, "eta_s": round(event.eta_s, 3)})
        elif isinstance(event, Started):
            if not await self._starts.claim(job_id, event.attempt):
                self.engine.cancel(job_id)  # cancelled (or finished) in the database meanwhile
                return
            self._update(ticket, "started", {"attempt": event.attempt})
            self._webhooks(ticket)
        elif isinstance(event, Progress):
            data: dict[str, Any] = {"step": event.step, "total": event.total}
            if event.preview_png:
                data["preview"] = base64.b64encode(event.preview_png).decode()
            self._update(ticket, "progress", data)
            await self._progress_webhook(ticket, event.step, event.total)
        elif isinstance(event, Requeued):
            await asyncio.to_thread(jobs.requeue_job, self.db, job_id)
            self._update(ticket, "requeued", {"reason": event.reason})
        elif isinstance(event, Completed):
            view = await asyncio.to_thread(jobs.store_images, self.db, self.store, job_id, ticket, list(event.images))
            self._finish(ticket, view)
        elif isinstance(event, Failed):
            log.warning("job %s failed: %s: %s", job_id, event.code, event.message)
            await asyncio.to_thread(
                jobs.fail_job, self.db, job_id, event.code,
                f"The image could not be generated ({event.code}); your quota was refunded.",
            )
            self._finish(ticket, await asyncio.to_thread(jobs.get_job, self.db, job_id))
        elif isinstance(event, Cancelled):
            view = await asyncio.to_thread(jobs.cancel_job, self.db, job_id, None)
            self._finish(ticket, view)

    def _finish(self, ticket: Ticket, view: jobs.JobView) -> None:
        """The terminal update says what the database holds (a cancel may have won over a completion)."""
        name, data = terminal_event(view)
        self._update(ticket, name, data, view)
        self._tickets.pop(ticket.job_id, None)
        self._progress_at.pop(ticket.job_id, None)
        self._webhooks(ticket)

    def _webhooks(self, ticket: Ticket) -> None:
        if webhooks_outbox.subscription(ticket.params) is not None:
            self.webhooks_written()

    async def _progress_webhook(self, ticket: Ticket, step: int, total: int) -> None:
        """A progress delivery, at most every PROGRESS_EVERY_S per job (as Replicate's)."""
        if not webhooks_outbox.wants(ticket.params, "progress"):
            return
        now = time.monotonic()
        if now - self._progress_at.get(ticket.job_id, float("-inf")) < webhooks_outbox.PROGRESS_EVERY_S:
            return
        self._progress_at[ticket.job_id] = now
        if await asyncio.to_thread(jobs.report_progress, self.db, ticket.job_id, step, total):
            self.webhooks_written()
