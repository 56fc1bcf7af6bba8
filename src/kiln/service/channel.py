"""The channel between API processes and the scheduler: ZMQ sockets carrying `messages` structs.

The scheduler binds a ROUTER (requests from any number of API processes, each a DEALER) and a PUB
(job updates and its heartbeat to every API process, each a SUB). TCP addresses cross machines;
no broker or other server is needed. A request never waits on a missing scheduler for long:
`admit` gives up after its timeout, and the API answers for itself (see `scheduler_client`).

With several schedulers (one active, standbys: see `leadership`), an API process keeps a DEALER and
a SUB per scheduler (`SchedulerLinks`) and sends to the one whose heartbeat says it is active; a
standby binds only its PUB, publishing a heartbeat that says "standby".
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from kiln.service.messages import (
    Admit,
    AdmitReply,
    Cancel,
    JobUpdate,
    Release,
    Status,
    Submit,
    decode_from_scheduler,
    decode_to_scheduler,
    encode,
)
from kiln.errors import ConfigError

log = logging.getLogger(__name__)

EVENTS_HWM = 200_000
"""Messages a slow subscriber may fall behind by before ZMQ drops (the API reconciles from the database)."""


class SchedulerServer:
    """The scheduler's end: answers `Admit`, takes `Submit`/`Release`/`Cancel`, publishes updates."""

    def __init__(
        self,
        handler: Any,
        control_url: str,
        events_url: str,
        *,
        status: Callable[[], Status],
        status_every_s: float = 0.25,
    ) -> None:
        if len(split_urls(control_url)) != 1 or len(split_urls(events_url)) != 1:
            raise ConfigError("A scheduler binds one scheduler_url and one scheduler_events_url "
                              "(lists of several are for API processes).")
        self.handler = handler
        """The `Scheduler`: admit(), submit(), release(), cancel(); None for a standby's heartbeat."""
        self.control_url = control_url
        self.events_url = events_url
        self._status = status
        self._status_every_s = status_every_s
        self._ctx: zmq.asyncio.Context | None = None
        self._sync_ctx: zmq.Context | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._pub: zmq.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._submits: set[asyncio.Task[None]] = set()

    async def start(self, *, requests: bool = True) -> None:
        """Bind and beat. `requests=False` (a standby) binds only the PUB: requests that API
        processes queued for this address wait in their DEALERs until it is the active one."""
        self._ctx, self._sync_ctx = zmq.asyncio.Context(), zmq.Context()
        if requests:
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            self._router.bind(self.control_url)
        self._pub = self._sync_ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, EVENTS_HWM)
        self._pub.bind(self.events_url)
        self._tasks = [asyncio.create_task(self._beat(), name="kiln-scheduler-heartbeat")]
        if requests:
            self._tasks.append(asyncio.create_task(self._serve(), name="kiln-scheduler-requests"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._submits, return_exceptions=True)
        for ctx in (self._ctx, self._sync_ctx):
            if ctx is not None:
                ctx.destroy(linger=0)
        self._router = self._pub = self._ctx = self._sync_ctx = None

    def publish(self, message: msgspec.Struct) -> None:
        """Never blocks: a subscriber that cannot keep up loses messages, not the scheduler's time."""
        if self._pub is not None:
            with contextlib.suppress(zmq.Again):
                self._pub.send(encode(message), zmq.NOBLOCK)

    async def _serve(self) -> None:
        assert self._router is not None
        while True:
            identity, *payloads = await self._router.recv_multipart()
            replies = [reply for payload in payloads if (reply := self._handle(payload)) is not None]
            if replies:  # one send for all the answers this batch asked for
                await self._router.send_multipart([identity, *replies])

    def _handle(self, payload: bytes) -> bytes | None:
        """One request: the encoded answer for an `Admit`, None for the rest."""
        try:
            message = decode_to_scheduler(payload)
        except msgspec.DecodeError:
            log.warning("dropped a malformed message from an API process")
            return None
        try:
            if isinstance(message, Admit):
                return encode(self.handler.admit(message))
            if isinstance(message, Submit):
                task = asyncio.create_task(self.handler.submit(message.ticket, message.hold_id))
                self._submits.add(task)
                task.add_done_callback(self._submit_done)
            elif isinstance(message, Release):
                self.handler.release(message.hold_id)
            elif isinstance(message, Cancel):
                self.handler.cancel(message.job_id)
        except Exception:  # noqa: BLE001 - one bad request must not end the channel
            log.exception("handling %s failed", type(message).__name__)
        return None

    def _submit_done(self, task: asyncio.Task[None]) -> None:
        self._submits.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("submitting a job failed", exc_info=task.exception())

    async def _beat(self) -> None:
        while True:
            try:
                self.publish(self._status())
            except Exception:
                log.exception("building the scheduler status failed")
            await asyncio.sleep(self._status_every_s)


class SchedulerLink:
    """An API process's end. `on_update` and `on_status` run on this process's event loop."""

    def __init__(
        self,
        control_url: str,
        events_url: str,
        *,
        on_update: Callable[[JobUpdate], None],
        on_status: Callable[[Status], None],
    ) -> None:
        self.control_url = control_url
        self.events_url = events_url
        self._on_update = on_update
        self._on_status = on_status
        self._ctx: zmq.asyncio.Context | None = None
        self._dealer: zmq.asyncio.Socket | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._replies: dict[int, asyncio.Future[AdmitReply]] = {}
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._outbox: list[bytes] = []
        self._flush_scheduled = False

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        self._dealer = self._ctx.socket(zmq.DEALER)
        self._dealer.setsockopt(zmq.LINGER, 0)
        self._dealer.connect(self.control_url)
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, EVENTS_HWM)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(self.events_url)
        self._tasks = [asyncio.create_task(self._read_replies(), name="kiln-scheduler-replies"),
                       asyncio.create_task(self._read_updates(), name="kiln-scheduler-updates")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
        self._dealer = self._sub = self._ctx = None

    def next_request_id(self) -> int:
        return next(self._ids)

    async def admit(self, message: Admit, timeout_s: float) -> AdmitReply | None:
        """The scheduler's answer, or None when it did not come within `timeout_s`."""
        assert self._dealer is not None
        future: asyncio.Future[AdmitReply] = asyncio.get_running_loop().create_future()
        self._replies[message.req_id] = future
        try:
            self._post(encode(message))
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            return None
        finally:
            self._replies.pop(message.req_id, None)

    async def send(self, message: Submit | Release | Cancel) -> None:
        self._post(encode(message))

    def _post(self, data: bytes) -> None:
        """Queue a message; everything queued in one turn of the event loop goes as one ZMQ message
        (a flood of admissions costs one send per turn, not two per request)."""
        self._outbox.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        frames, self._outbox = self._outbox, []
        if frames and self._dealer is not None:
            self._dealer.send_multipart(frames)  # DEALER: queued by ZMQ while the scheduler is away

    async def _read_replies(self) -> None:
        assert self._dealer is not None
        while True:
            for frame in await self._dealer.recv_multipart():
                reply = decode_from_scheduler(frame)
                if isinstance(reply, AdmitReply) and (future := self._replies.get(reply.req_id)) is not None:
                    if not future.done():
                        future.set_result(reply)

    async def _read_updates(self) -> None:
        assert self._sub is not None
        while True:
            data = await self._sub.recv()
            try:
                message = decode_from_scheduler(data)
                if isinstance(message, JobUpdate):
                    self._on_update(message)
                elif isinstance(message, Status):
                    self._on_status(message)
            except Exception:
                log.exception("handling a scheduler update failed")


def split_urls(value: str) -> list[str]:
    """`tcp://a:8001, tcp://b:8001` → one address per scheduler."""
    return [url.strip() for url in value.split(",") if url.strip()]


class SchedulerLinks:
    """An API process's ends to every scheduler it knows: a `SchedulerLink` each (a single DEALER
    connected to several schedulers would deal requests round-robin, standbys included). Requests go
    to the active one — among those whose latest heartbeat says "active" and is fresh, the one that
    started last (an old leader that does not know it lost yet is never preferred). With none active,
    `admit` answers None at once and `send` goes to every scheduler: a job admitted meanwhile waits in
    each DEALER and reaches whichever becomes active. `on_status` hears the active one only."""

    def __init__(
        self,
        control_urls: str,
        events_urls: str,
        *,
        on_update: Callable[[JobUpdate], None],
        on_status: Callable[[Status], None],
        timeout_s: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        controls, events = split_urls(control_urls), split_urls(events_urls)
        if not controls or len(controls) != len(events):
            raise ConfigError("scheduler_url and scheduler_events_url must name as many schedulers, "
                              f"in the same order (got {len(controls)} and {len(events)}).")
        self._on_status = on_status
        self._timeout_s = timeout_s
        self._monotonic = monotonic
        self._ids = itertools.count(1)
        self.links = [
            SchedulerLink(control, event, on_update=on_update,
                          on_status=lambda status, index=index: self._heard(index, status))
            for index, (control, event) in enumerate(zip(controls, events, strict=True))
        ]
        self.heard: list[tuple[float, Status] | None] = [None] * len(self.links)
        """The latest heartbeat from each scheduler and when it came (this process's monotonic clock)."""

    async def start(self) -> None:
        for link in self.links:
            await link.start()

    async def stop(self) -> None:
        await asyncio.gather(*(link.stop() for link in self.links))

    def next_request_id(self) -> int:
        return next(self._ids)

    def active(self) -> SchedulerLink | None:
        now = self._monotonic()
        live = [(status.started_at, index) for index, heard in enumerate(self.heard) if heard is not None
                for at, status in [heard] if status.role == "active" and now - at <= self._timeout_s]
        return self.links[max(live)[1]] if live else None

    def standbys(self) -> int:
        """Schedulers heard from lately that say they are standing by."""
        now = self._monotonic()
        return sum(1 for heard in self.heard
                   if heard is not None and heard[1].role == "standby" and now - heard[0] <= self._timeout_s)

    async def admit(self, message: Admit, timeout_s: float) -> AdmitReply | None:
        link = self.active()
        return None if link is None else await link.admit(message, timeout_s)

    async def send(self, message: Submit | Release | Cancel) -> None:
        link = self.active()
        for target in [link] if link is not None else self.links:
            await target.send(message)

    def _heard(self, index: int, status: Status) -> None:
        self.heard[index] = (self._monotonic(), status)
        if status.role == "active" and self.active() is self.links[index]:
            self._on_status(status)
