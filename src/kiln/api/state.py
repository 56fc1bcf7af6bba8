"""Everything a running server holds, built once by the app factory and reached via `request.app`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from kiln.config import Settings
from kiln.db.engine import make_engine, make_session_factory
from kiln.service import content_credentials
from kiln.service.clock import Clock, SystemClock
from kiln.service.moderation import Moderation
from kiln.service.plan_cache import PlanCache
from kiln.service.plans import ensure_plans
from kiln.service.runner import InlineJobRunner, JobRunner
from kiln.service.storage import ImageStore
from kiln.worker.registry import ModelRegistry

RunnerFactory = Callable[["AppState"], JobRunner]
"""Builds the job runner from the rest of the state (the engine plugs in here)."""


def inline_runner(state: AppState) -> JobRunner:
    # One job at a time: the registry's pipelines are shared objects, not safe to call from two threads.
    return InlineJobRunner(state.db, state.registry, state.store, concurrency=1)


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
        state.runner = (runner_factory or inline_runner)(state)
        return state

    async def start(self) -> None:
        ensure_plans(self.db, self.settings.plans)
        await self.runner.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.runner.stop()
        self.engine.dispose()
