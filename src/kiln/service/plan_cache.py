"""Live plan limits with a short cache: `kiln plans set …` reaches every running server within
`live_settings_poll_s`, without a database read on every request. With Redis, a change made through
any replica or the CLI is announced, and every replica reads the plans again at once (`changed`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from kiln.errors import ConfigError
from kiln.service.plans import PlanLimits, list_plans


class PlanCache:
    def __init__(
        self,
        factory: sessionmaker[Session],
        ttl_s: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = factory
        self._ttl_s = ttl_s
        self._monotonic = monotonic
        self._plans: dict[str, PlanLimits] = {}
        self._loaded_at: float | None = None
        self._lock = threading.Lock()
        self.announce: Callable[[], None] | None = None
        """Tells the other replicas that plans changed; None: no one to tell."""

    def get(self, name: str) -> PlanLimits:
        """The plan's limits, at most `ttl_s` old."""
        with self._lock:
            now = self._monotonic()
            if self._loaded_at is None or now - self._loaded_at >= self._ttl_s or name not in self._plans:
                self._plans = {p.name: p for p in list_plans(self._factory)}
                self._loaded_at = now
            plan = self._plans.get(name)
        if plan is None:
            raise ConfigError(f"plan {name!r} does not exist")
        return plan

    def peek(self, name: str) -> PlanLimits | None:
        """The plan from memory while fresh; None when it must be read."""
        if self._loaded_at is None or self._monotonic() - self._loaded_at >= self._ttl_s:
            return None
        return self._plans.get(name)

    async def get_async(self, name: str) -> PlanLimits:
        """`get` without blocking the event loop: from memory while fresh, else read in a thread."""
        now = self._monotonic()
        if self._loaded_at is not None and now - self._loaded_at < self._ttl_s:
            plan = self._plans.get(name)
            if plan is not None:
                return plan
        return await asyncio.to_thread(self.get, name)

    def invalidate(self) -> None:
        with self._lock:
            self._loaded_at = None

    def changed(self) -> None:
        """Plans were changed through this process: read them again here, and everywhere."""
        self.invalidate()
        if self.announce is not None:
            self.announce()
