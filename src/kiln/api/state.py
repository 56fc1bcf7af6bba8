"""Everything a running server holds, built once by the app factory and reached via `request.app`."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from kiln.config import Settings
from kiln.db.engine import make_engine, make_session_factory
from kiln.service.plans import ensure_plans
from kiln.worker.registry import ModelRegistry


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    db: sessionmaker[Session]
    registry: ModelRegistry
    ready: bool = False

    @classmethod
    def build(cls, settings: Settings) -> AppState:
        engine = make_engine(settings.database_url)
        return cls(
            settings=settings,
            engine=engine,
            db=make_session_factory(engine),
            registry=ModelRegistry.from_settings(settings),
        )

    async def start(self) -> None:
        ensure_plans(self.db, self.settings.plans)
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        self.engine.dispose()
