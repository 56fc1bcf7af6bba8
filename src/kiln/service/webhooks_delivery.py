"""The webhook deliverer: a thread of the scheduler process with its own event loop that sends due
outbox rows with httpx, signed per Standard Webhooks (`standardwebhooks`), and settles each attempt.

Only a 2xx is success. Anything else (or no answer) is tried again on the retry schedule (the spec's
by default: now, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h) with jitter, never sooner than
a Retry-After asks; 410 Gone disables the endpoint for its user. Each URL passes the SSRF guard at
send time and the connection is pinned to the checked address; no redirect is followed, the answer's
body is read only up to a few KiB. It never touches a job's row.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import logging
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook

from kiln.db.models import utcnow
from kiln.errors import InvalidRequest
from kiln.service import webhooks_guard, webhooks_outbox
from kiln.service.webhooks_outbox import Due, Settlement

log = logging.getLogger(__name__)

SPEC_SCHEDULE_S = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 72000.0, 86400.0)
JITTER = 0.2
"""A retry's delay is the schedule's ± this fraction, so a receiver coming back is not stampeded."""
MAX_BODY_READ = 4096
PENDING_EVERY_S = 5.0
"""How often the pending-rows gauge is recounted while nothing is being sent."""
OUTCOMES = ("delivered", "retrying", "failed", "disabled", "dropped", "refused")


def retry_delay_s(schedule: Sequence[float], attempts: int, retry_after_s: float | None = None,
                  rng: random.Random | None = None) -> float | None:
    """Seconds until the next try after `attempts` tries failed (None: the schedule is used up).
    A Retry-After longer than the schedule's delay wins (capped at the schedule's longest)."""
    if attempts >= len(schedule):
        return None
    base = schedule[attempts]
    delay = base * (1.0 + (rng or random).uniform(-JITTER, JITTER))
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, max(schedule)))
    return max(0.0, delay)


def retry_after_of(value: str | None, now: dt.datetime | None = None) -> float | None:
    """A Retry-After header in seconds (delta-seconds or an HTTP date), None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - (now or utcnow())).total_seconds())


class DeliveryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.deliveries = Counter("kiln_webhook_deliveries", "Webhook delivery attempts by outcome.",
                                  ["outcome"], registry=registry)
        for outcome in OUTCOMES:
            self.deliveries.labels(outcome)
        self.pending = Gauge("kiln_webhook_outbox_pending", "Webhook deliveries waiting to be sent.",
                             registry=registry)


class WebhookDeliverer:
    """Sends the outbox from a thread of its own; `start()` and `stop()` from any thread."""

    def __init__(
        self,
        db: sessionmaker[Session],
        *,
        schedule_s: Sequence[float] = SPEC_SCHEDULE_S,
        allow_private: bool = False,
        poll_s: float = 0.5,
        connect_timeout_s: float = 3.0,
        timeout_s: float = 10.0,
        max_concurrent: int = 16,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.db = db
        self.schedule_s = tuple(schedule_s)
        self.allow_private = allow_private
        self.poll_s = poll_s
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self.max_concurrent = max_concurrent
        self.metrics = DeliveryMetrics(registry or CollectorRegistry())
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._ready = threading.Event()
        self._counted_at = float("-inf")

    @classmethod
    def of(cls, settings: Any, db: sessionmaker[Session], registry: CollectorRegistry) -> WebhookDeliverer:
        """A deliverer configured by Kiln's settings (the `webhook_*` ones)."""
        return cls(db, schedule_s=settings.webhook_retry_schedule_s,
                   allow_private=settings.webhook_allow_private, poll_s=settings.webhook_poll_s, connect_timeout_s=settings.webhook_connect_timeout_s,
                   timeout_s=settings.webhook_timeout_s, max_concurrent=settings.webhook_max_concurrent,
                   registry=registry)

    @property
    def claim_s(self) -> float:
        """How long a claimed delivery stays claimed: past the longest one attempt can take."""
        return self.timeout_s + self.connect_timeout_s + 30.0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name="kiln-webhooks",
                                            daemon=True)
            self._thread.start()
            self._ready.wait(10)

    def stop(self, timeout_s: float = 15.0) -> None:
        if self._thread is not None and self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout_s)
        self._thread = None

    def wake(self) -> None:
        """Look at the outbox now (a row was just written in this process)."""
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop, self._wake = asyncio.Event(), asyncio.Event()
        self._ready.set()
        timeout = httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s)
        # No keep-alive: connections are to pinned addresses, and a pooled one must never carry
        # another host's TLS name. No proxies from the environment: the guard checked this address.
        limits = httpx.Limits(max_connections=self.max_concurrent, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=False,
                                     trust_env=False) as client:
            while not self._stop.is_set():
                try:
                    sent = await self._round(client)
                except Exception:
                    log.exception("webhook delivery round failed")
                    sent = 0
                if sent == 0:
                    await self._idle()

    async def _idle(self) -> None:
        assert self._stop is not None and self._wake is not None
        waits = [asyncio.ensure_future(self._stop.wait()), asyncio.ensure_future(self._wake.wait())]
        await asyncio.wait(waits, timeout=self.poll_s, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waits:
            waiter.cancel()
        self._wake.clear()

    async def _round(self, client: httpx.AsyncClient) -> int:
        """Claim what is due, send it (each delivery on its own) and record the outcomes in one
        transaction; returns how many were claimed or dropped."""
        due, dropped = await asyncio.to_thread(webhooks_outbox.claim_due, self.db, self.max_concurrent,
                                               self.claim_s)
        self._count("dropped", dropped)
        outcomes = await asyncio.gather(*(self._deliver(client, item) for item in due))
        await asyncio.to_thread(webhooks_outbox.settle_many, self.db, [o for o in outcomes if o is not None])
        now = time.monotonic()
        if due or dropped or now - self._counted_at >= PENDING_EVERY_S:
            self._counted_at = now
            self.metrics.pending.set(await asyncio.to_thread(webhooks_outbox.pending_count, self.db))
        return len(due) + dropped

    def _count(self, outcome: str, n: int = 1) -> None:
        if n:
            self.metrics.deliveries.labels(outcome).inc(n)

    async def _deliver(self, client: httpx.AsyncClient, due: Due) -> Settlement | None:
        """One attempt; its outcome to record (None: already recorded, a 410's)."""
        attempts = due.attempts + 1
        try:
            target = await asyncio.to_thread(webhooks_guard.pin, due.url, self.allow_private)
        except InvalidRequest as exc:  # resolves somewhere it may not go: never sent
            log.warning("webhook %s to %s refused: %s", due.id, due.url, exc.message)
            self._count("refused")
            return Settlement(due.seq, "refused", attempts, error=exc.message)
        except OSError as exc:
            return self._failed(due, attempts, None, f"the name did not resolve: {exc}")
        now = utcnow()
        headers = {
            "host": target.host_header,
            "content-type": "application/json",
            "user-agent": "Kiln-Webhooks",
            "webhook-id": due.id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": Webhook(due.secret).sign(due.id, now, due.body),
        }
        try:
            async with asyncio.timeout(self.timeout_s):
                async with client.stream("POST", target.url, content=due.body.encode(), headers=headers,
                                         extensions=target.extensions) as response:
                    answer = await _read_some(response)
        except (httpx.HTTPError, TimeoutError) as exc:
            return self._failed(due, attempts, None, f"{type(exc).__name__}: {exc}"[:500])
        code = response.status_code
        if 200 <= code < 300:
            self._count("delivered")
            return Settlement(due.seq, "delivered", attempts, status_code=code)
        if code == 410:
            dropped = await asyncio.to_thread(webhooks_outbox.disable_endpoint, self.db, due,
                                              attempts=attempts, status_code=code)
            log.warning("webhook endpoint %s answered 410 Gone: disabled for %s", due.url, due.user_id)
            self._count("disabled")
            self._count("dropped", dropped)
            return None
        return self._failed(due, attempts, code, f"HTTP {code}: {answer}"[:500],
                            retry_after_of(response.headers.get("retry-after")))

    def _failed(self, due: Due, attempts: int, code: int | None, error: str,
                retry_after_s: float | None = None) -> Settlement:
        delay = retry_delay_s(self.schedule_s, attempts, retry_after_s)
        if delay is None:
            log.warning("webhook %s to %s failed after %d attempts: %s", due.id, due.url, attempts, error)
            self._count("failed")
            return Settlement(due.seq, "failed", attempts, code, error)
        self._count("retrying")
        return Settlement(due.seq, "pending", attempts, code, error, utcnow() + dt.timedelta(seconds=delay))


async def _read_some(response: httpx.Response) -> str:
    """The start of the answer (for the delivery's record), never more than MAX_BODY_READ bytes."""
    seen = b""
    async for chunk in response.aiter_raw():
        seen += chunk
        if len(seen) >= MAX_BODY_READ:
            break
    return seen[:MAX_BODY_READ].decode("utf-8", "replace")
