"""An API process's view of the scheduler: ask it to admit, hand it jobs, cancel them, and follow
their events (the one per-job history is kept here, in `JobLogs`).

The scheduler may be away (restarting, killed): `admit` then raises `SchedulerAway` within
`timeout_s`, never hangs; jobs admitted meanwhile stay queued in the database, unleased, and a
scheduler adopts them when it is back. Waiting requests also poll the database now and then, so a
lost update never leaves one hanging.

With `redis_url` set, events are followed in the job's Redis stream instead (`job_streams`), which the
scheduler writes: so a job submitted through one replica is followed, resumed and looked up on any.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from kiln.errors import Overloaded
from kiln.service import jobs
from kiln.service.channel import SchedulerLinks
from kiln.service.job_events import JobEvent, JobOutcome, outcome_of, terminal_event
from kiln.service.job_log import JobLogs, position_of
from kiln.service.job_streams import JobStreamReader
from kiln.service.messages import Admit, Cancel, JobUpdate, Release, Status, Submit, Ticket
from kiln.service.plans import PlanLimits
from kiln.service.refusals import Refusals

log = logging.getLogger(__name__)

DB_POLL_S = 2.0
"""How often a waiting request checks the database too, in case an update was lost."""


def _outcome_of_event(job_id: str, event: JobEvent | None) -> JobOutcome | None:
    """A terminal event says what the database holds (the scheduler publishes it after the write)."""
    if event is None or not event.terminal:
        return None
    if event.name == "completed":
        return JobOutcome(job_id, "succeeded", tuple(event.data.get("image_ids", ())))
    if event.name == "failed":
        error = event.data.get("error") or {}
        return JobOutcome(job_id, "failed", (), error.get("code"), error.get("message"))
    return JobOutcome(job_id, "cancelled")


class SchedulerAway(Exception):
    """No scheduler answered: nothing can promise when a job would run."""


@dataclass(frozen=True)
class Decision:
    hold_id: str
    expected_wait_s: float
    position: int
    steps: int
    width: int
    height: int


class SchedulerClient:
    def __init__(
        self,
        db: sessionmaker[Session],
        refusals: Refusals,
        *,
        control_url: str,
        events_url: str,
        timeout_s: float = 1.0,
        poll_s: float = 0.5,
        history_jobs: int = 2000,
        monotonic: Callable[[], float] = time.monotonic,
        streams: JobStreamReader | None = None,
    ) -> None:
        self.db = db
        self.streams = streams
        """The jobs' Redis streams (None: events are this process's own `logs`)."""
        self.refusals = refusals
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self._monotonic = monotonic
        self.logs = JobLogs(history_jobs)
        self.status: Status | None = None
        self._status_at = float("-inf")
        self._status_changed: asyncio.Event | None = None
        self.link = SchedulerLinks(control_url, events_url, on_update=self._on_update, on_status=self._on_status,
                                   timeout_s=timeout_s, monotonic=monotonic)
        """A link per scheduler (`control_url`/`events_url` may list several); requests go to the active one."""

    async def start(self) -> None:
        self._status_changed = asyncio.Event()
        await self.link.start()
        if self.streams is not None:
            await self.streams.start()

    async def stop(self) -> None:
        if self.streams is not None:
            await self.streams.stop()
        await self.link.stop()

    # ---- is it there?

    @property
    def available(self) -> bool:
        return self.status is not None and self._monotonic() - self._status_at <= self.timeout_s

    @property
    def scheduler_id(self) -> str | None:
        return self.status.scheduler_id if self.available and self.status else None

    async def wait_available(self, timeout_s: float) -> bool:
        deadline = self._monotonic() + timeout_s
        while not self.available:
            left = deadline - self._monotonic()
            if left <= 0:
                return False
            assert self._status_changed is not None
            self._status_changed.clear()
            try:
                await asyncio.wait_for(self._status_changed.wait(), left)
            except TimeoutError:
                return False
        return True

    # ---- admission and jobs

    async def admit(self, user_id: str, plan: PlanLimits, spec: jobs.JobSpec, relax: bool = False) -> Decision:
        """The scheduler's admission (maybe degraded); raises Overloaded or SchedulerAway."""
        if not self.available:
            raise SchedulerAway()
        hold_id = f"hold-{uuid.uuid4().hex}"
        reply = await self.link.admit(Admit(
            req_id=self.link.next_request_id(), hold_id=hold_id, user_id=user_id, plan=plan.name,
            weight=plan.priority_weight, wait_target_s=plan.wait_target_s, model=spec.model,
            task=spec.params.get("task", "generate"), width=spec.width, height=spec.height, steps=spec.steps,
            guidance_scale=spec.guidance_scale, n=spec.n, relax=relax, loras=jobs.loras_of(spec.params),
        ), self.timeout_s)
        if reply is None:
            raise SchedulerAway()
        if not reply.accepted:
            self.refusals.overloaded(plan.name, user_id, reply.retry_after_s, reply.message)
            raise Overloaded(reply.message, retry_after_s=reply.retry_after_s)
        return Decision(hold_id, reply.expected_wait_s, reply.position, reply.steps, reply.width, reply.height)

    async def release(self, hold_id: str) -> None:
        await self.link.send(Release(hold_id))

    async def submit(self, view: jobs.JobView, hold_id: str = "") -> None:
        """Hand over an admitted job; its events are followed from here on."""
        self.logs.open(view.id, view.user_id)
        await self.link.send(Submit(Ticket.of(view), hold_id))

    async def cancel(self, job_id: str) -> None:
        await self.link.send(Cancel(job_id))

    # ---- following jobs

    def position(self, job_id: str) -> tuple[int | None, float | None]:
        log_ = self.logs.get(job_id)
        return (None, None) if log_ is None else log_.position()

    async def position_anywhere(self, job_id: str) -> tuple[int | None, float | None]:
        """`position`, or for a job another replica submitted, from its stream's latest events."""
        log_ = self.logs.get(job_id)
        if log_ is not None or self.streams is None:
            return self.position(job_id)
        try:
            latest = await self.streams.last(job_id, 8)
        except Exception:  # noqa: BLE001 - a position is a nicety; the row still answers
            log.warning("reading a job stream failed", exc_info=True)
            return None, None
        return position_of(reversed(latest))

    async def last_event_id(self, job_id: str) -> int | None:
        """The terminal event's id of a finished job whose events are still kept, else None."""
        if self.streams is not None:
            try:
                latest = await self.streams.last(job_id)
            except Exception:  # noqa: BLE001 - then the stream is replayed
                latest = []
            return latest[0].id if latest and latest[0].terminal else None
        log_ = self.logs.finished.get(job_id)
        return None if log_ is None else log_.next_id - 1

    async def wait(self, job_id: str, timeout_s: float) -> JobOutcome:
        """The job's outcome once it ends (from its terminal event, or its row), or its status when
        `timeout_s` passes. A followed job costs a read only if its updates go quiet for 2 s."""
        deadline = self._monotonic() + timeout_s
        while True:
            remaining = deadline - self._monotonic()
            log_ = self.logs.get(job_id)
            if log_ is not None:
                if log_.done.is_set() and (outcome := _outcome_of_event(job_id, log_.last)) is not None:
                    return outcome
                if remaining > 0 and not log_.done.is_set():
                    try:
                        await asyncio.wait_for(log_.done.wait(), min(remaining, DB_POLL_S))
                        continue
                    except TimeoutError:
                        pass
            view = await asyncio.to_thread(jobs.get_job, self.db, job_id)
            if view.terminal or remaining <= 0:
                return outcome_of(view)
            if log_ is None:  # run by a process whose events we do not follow
                await asyncio.sleep(min(remaining, self.poll_s))

    async def events(self, job_id: str, after: int = 0) -> AsyncIterator[JobEvent]:
        """The job's events with ids above `after`: replayed, then live, ending with the terminal one.
        A job this process does not follow is followed in the database."""
        if self.streams is not None:
            async for event in self._events_from_stream(job_id, after):
                yield event
            return
        async for event in self._local_events(job_id, after):
            yield event

    async def _local_events(self, job_id: str, after: int) -> AsyncIterator[JobEvent]:
        log_ = self.logs.get(job_id)
        if log_ is None:
            async for event in self._events_from_db(job_id, after):
                yield event
            return
        watchdog = asyncio.ensure_future(self._watch_in_db(job_id))
        try:
            async for event in log_.follow(after):
                yield event
        finally:
            watchdog.cancel()

    async def _events_from_stream(self, job_id: str, after: int) -> AsyncIterator[JobEvent]:
        """The job's Redis stream: replayed, then live through the shared read. Its row is looked at
        when the stream goes quiet for `DB_POLL_S`: a job that ended without its event reaching the
        stream (a scheduler gone, Redis away) still ends its followers."""
        assert self.streams is not None
        try:
            replay = await self.streams.history(job_id, after)
        except Exception:  # noqa: BLE001 - Redis away: what this process knows itself
            log.warning("reading a job stream failed; following the job here", exc_info=True)
            async for event in self._local_events(job_id, after):
                yield event
            return
        if not replay:  # nothing (more) in the stream: perhaps it expired long after the job ended
            view = await asyncio.to_thread(jobs.get_job, self.db, job_id)
            if view.terminal:
                name, data = terminal_event(view)
                yield JobEvent(after + 1, name, data)
                return
        last = after
        for event in replay:
            yield event
            last = event.id
            if event.terminal:
                return
        follower = self.streams.subscribe(job_id, last)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(follower.queue.get(), DB_POLL_S)
                except TimeoutError:
                    view = await asyncio.to_thread(jobs.get_job, self.db, job_id)
                    if not view.terminal:
                        continue
                    try:  # it ended: its event is in the stream, or was lost on the way
                        tail = await self.streams.history(job_id, last)
                    except Exception:  # noqa: BLE001 - the row says how it ended
                        tail = []
                    if not any(e.terminal for e in tail):
                        name, data = terminal_event(view)
                        tail = [*tail, JobEvent(max([last, *(e.id for e in tail)]) + 1, name, data)]
                    for event in tail:
                        yield event
                        if event.terminal:
                            return
                    continue
                yield event
                last = event.id
                if event.terminal:
                    return
        finally:
            self.streams.unsubscribe(job_id, follower)

    async def _watch_in_db(self, job_id: str) -> None:
        """While a followed job has not ended here, look at its row now and then: if it ended and
        the update was lost, say what happened, so no stream or waiting request hangs."""
        log_ = self.logs.get(job_id)
        while log_ is not None and not log_.done.is_set():
            await asyncio.sleep(DB_POLL_S)
            view = await asyncio.to_thread(jobs.get_job, self.db, job_id)
            if view.terminal and not log_.done.is_set():
                self._finish_from_db(view)

    def _finish_from_db(self, view: jobs.JobView) -> None:
        name, data = terminal_event(view)
        self.logs.publish(view.id, name, data)

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

    # ---- from the scheduler

    def _on_update(self, update: JobUpdate) -> None:
        self.refusals.on_update(update)
        self.logs.publish(update.job_id, update.name, update.data)

    def _on_status(self, status: Status) -> None:
        self.status = status
        self._status_at = self._monotonic()
        if self._status_changed is not None:
            self._status_changed.set()
