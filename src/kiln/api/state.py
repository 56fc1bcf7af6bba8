"""Everything an API process holds, built once by the app factory and reached via `request.app`.

The API process never runs the engine: it admits jobs (refusals from memory, the scheduler's estimate,
the admission transaction) and follows them through `SchedulerClient`.
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
from kiln.service.key_cache import KeyCache
from kiln.service.moderation import Moderation
from kiln.service.plan_cache import PlanCache
from kiln.service.plans import ensure_plans
from kiln.service.prompts.composer import PromptComposer
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

    @classmethod
    def build(cls, settings: Settings, *, clock: Clock | None = None) -> AppState:
        engine = make_engine(settings.database_url)
        db = make_session_factory(engine)
        refusals = Refusals()
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
                                   timeout_s=settings.scheduler_timeout_s),
        )
        state.metrics = AdmissionMetrics(state.metrics_registry)
        state.loop_lag = LoopLagProbe(state.metrics_registry, interval_s=LOOP_LAG_INTERVAL_S)
        state.prompts = PromptComposer.from_settings(settings)
        return state

    async def start(self) -> None:
        await asyncio.to_thread(ensure_plans, self.db, self.settings.plans)
        self.admissions.start()
        await self.keys.start()
        await self.runner.start()
        self.loop_lag.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.loop_lag.stop()
        await self.runner.stop()
        await self.keys.stop()
        await asyncio.to_thread(self.admissions.stop)
        self.engine.dispose()
