"""Everything a running server holds, built once by the app factory and reached via `request.app`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from kiln.config import Settings
from kiln.db.engine import make_engine, make_session_factory
from kiln.engine import EngineMetrics, build_local_engine
from kiln.service import content_credentials
from kiln.service.clock import Clock, SystemClock
from kiln.service.engine_runner import EngineJobRunner
from kiln.service.moderation import Moderation
from kiln.service.plan_cache import PlanCache
from kiln.service.plans import ensure_plans
from kiln.service.runner import JobRunner
from kiln.service.storage import ImageStore
from kiln.worker.registry import ModelRegistry

RunnerFactory = Callable[["AppState"], JobRunner]
"""Builds the job runner from the rest of the state (tests wrap the default one here)."""


def engine_runner(state: AppState) -> EngineJobRunner:
    """The scheduler over local worker processes: every job runs through the engine."""
    engine, executor = build_local_engine(state.settings, metrics=state.metrics)
    return EngineJobRunner(state.db, state.store, state.plans, engine, executor,
                           lease_s=state.settings.job_lease_s)


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
    runner: JobRunner = field(default=None)  # type: ignore[assignment]
    metrics_registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    """The engine's Prometheus series (`GET /metrics`); never the process-global registry."""
    metrics: EngineMetrics = field(default=None)  # type: ignore[assignment]

    @classmethod
    def build(
        cls, settings: Settings, *, clock: Clock | None = None, runner_factory: RunnerFactory | None = None
    ) -> AppState:
        engine = make_engine(settings.database_url)
        db = make_session_factory(engine)
        state = cls(
            settings=settings,
            engine=engine,
            db=db,
            registry=ModelRegistry.from_settings(settings),
            clock=clock or SystemClock(),
            store=ImageStore(
                settings.images_dir,
                content_credentials.ContentCredentials(settings.data_dir / "c2pa")
                if content_credentials.available() else None,
            ),
            plans=PlanCache(db, settings.live_settings_poll_s),
            moderation=Moderation(settings.moderation_blocklist),
        )
        state.metrics = EngineMetrics(state.metrics_registry)
        state.runner = (runner_factory or engine_runner)(state)
        return state

    async def start(self) -> None:
        ensure_plans(self.db, self.settings.plans)
        await self.runner.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.runner.stop()
        self.engine.dispose()
