"""Everything an API process holds, built once by the app factory and reached via `request.app`.

The API process never runs the engine: it admits jobs (refusals from memory, the scheduler's estimate,
the admission transaction) and follows them through `SchedulerClient`.

With `redis_url`, replicas share through Redis (`bus`): job events as streams any replica follows,
and revocations, plan changes and usage announced to every replica (`_share_through`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from kiln.config import Settings
from kiln.db.engine import make_engine, make_session_factory
from kiln.engine import AdmissionMetrics
from kiln.looplag import LoopLagProbe
from kiln.service.clock import Clock, SystemClock
from kiln.service.job_admission import AdmissionWriter
from kiln.service.job_streams import JobStreamReader
from kiln.service.key_cache import KeyCache
from kiln.service.moderation import Moderation
from kiln.service.plan_cache import PlanCache
from kiln.service.plans import ensure_plans
from kiln.service.prompts.composer import PromptComposer
from kiln.service.redis_bus import KeyRevoked, PlansChanged, RedisBus, UsageCounted
from kiln.service.refusals import Refusals
from kiln.service.scheduler_client import SchedulerClient
from kiln.service.storage import ImageStore, make_image_store
from kiln.worker.registry import ModelRegistry

LOOP_LAG_INTERVAL_S = 0.02

BrowserAccount = Callable[[Any], Awaitable[Any]]
"""The web UI's signed-in account for a request without an API key (installed by the web UI)."""


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    db: sessionmaker[Session]
    registry: ModelRegistry
    ready: bool = False
    clock: Clock = field(default_factory=SystemClock)
    """Time for quota days; tests pass a FakeClock."""
    store: ImageStore = field(default=None)  # type: ignore[assignment]
    plans: PlanCache = field(default=None)  # type: ignore[assignment]
    moderation: Moderation = field(default=None)  # type: ignore[assignment]
    refusals: Refusals = field(default_factory=Refusals)
    keys: KeyCache = field(default=None)  # type: ignore[assignment]
    admissions: AdmissionWriter = field(default=None)  # type: ignore[assignment]
    runner: SchedulerClient = field(default=None)  # type: ignore[assignment]
    metrics_registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    """This process's Prometheus series (`GET /metrics` adds the scheduler's); never the global one."""
    metrics: AdmissionMetrics = field(default=None)  # type: ignore[assignment]
    browser_account: BrowserAccount | None = None
    loop_lag: LoopLagProbe = field(default=None)  # type: ignore[assignment]
    """How late this process's event loop wakes (`kiln_event_loop_lag_seconds` in /metrics)."""
    prompts: PromptComposer = field(default=None)  # type: ignore[assignment]
    """Writes the prompt of a follow-up edit (POST /v1/jobs with `image_id`)."""
    bus: RedisBus | None = None
    """The Redis the replicas share (`redis_url`); None: this process alone."""

    @classmethod
    def build(cls, settings: Settings, *, clock: Clock | None = None) -> AppState:
        engine = make_engine(settings.database_url)
        db = make_session_factory(engine)
        refusals = Refusals()
        bus = RedisBus(settings.redis_url, settings.redis_prefix) if settings.redis_url else None
        streams = None if bus is None else JobStreamReader(bus.url, bus.prefix, bus.redis)
        state = cls(
            settings=settings,
            engine=engine,
            db=db,
            registry=ModelRegistry.from_settings(settings),
            clock=clock or SystemClock(),
            store=make_image_store(settings),
            plans=PlanCache(db, settings.live_settings_poll_s),
            moderation=Moderation(settings.moderation_blocklist),
            refusals=refusals,
            keys=KeyCache(db, refresh_s=settings.key_revocation_poll_s),
            admissions=AdmissionWriter(engine),
            runner=SchedulerClient(db, refusals, control_url=settings.scheduler_url,
                                   events_url=settings.scheduler_events_url,
                                   timeout_s=settings.scheduler_timeout_s, streams=streams),
            bus=bus,
        )
        if bus is not None:
            _share_through(bus, state)
        state.metrics = AdmissionMetrics(state.metrics_registry)
        state.loop_lag = LoopLagProbe(state.metrics_registry, interval_s=LOOP_LAG_INTERVAL_S)
        state.prompts = PromptComposer.from_settings(settings)
        return state

    async def start(self) -> None:
        await asyncio.to_thread(ensure_plans, self.db, self.settings.plans)
        self.admissions.start()
        await self.keys.start()
        if self.bus is not None:
            await self.bus.start()
        await self.runner.start()
        self.loop_lag.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.loop_lag.stop()
        await self.runner.stop()
        if self.bus is not None:
            await self.bus.stop()
        await self.keys.stop()
        await asyncio.to_thread(self.admissions.stop)
        self.engine.dispose()


def _share_through(bus: RedisBus, state: AppState) -> None:
    """What this replica tells the others, and what it does with what they tell: a revoked key is
    refused, plans are read again, a user's day total is counted. After a lost subscription the
    revocations and plans are read again and usage forgotten (read on next use)."""
    keys, plans, refusals = state.keys, state.plans, state.refusals
    keys.announce = lambda prefix: bus.announce(KeyRevoked(prefix))
    plans.announce = lambda: bus.announce(PlansChanged())
    refusals.announce = lambda user_id, day, used: bus.announce(UsageCounted(user_id, day, used))
    bus.on(KeyRevoked, lambda notice: keys.revoked_elsewhere(notice.prefix))
    bus.on(PlansChanged, lambda _notice: plans.invalidate())
    bus.on(UsageCounted, lambda notice: refusals.usage_elsewhere(notice.user_id, notice.day, notice.used))
    bus.on_resync(keys.resync)
    bus.on_resync(plans.invalidate)
    bus.on_resync(refusals.forget_usage)
