"""What every command needs, built on first use: settings and the database."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from kiln.config import Settings, load_settings
from kiln.errors import ConfigError


@dataclass
class CliState:
    config_file: Path | None = None
    _settings: Settings | None = field(default=None, repr=False)
    _factory: sessionmaker[Session] | None = field(default=None, repr=False)

    def settings(self, **overrides: object) -> Settings:
        if self._settings is None or overrides:
            try:
                self._settings = load_settings(self.config_file, **overrides)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ConfigError(f"bad setting {where}: {first['msg']}") from None
        return self._settings

    def announce(self, notice: object) -> None:
        """Tell every running replica at once through Redis (`redis_url`, a `redis_bus` notice);
        without it they read the database on their next poll."""
        settings = self.settings()
        if settings.redis_url:
            from kiln.service.redis_bus import announce_once

            announce_once(settings.redis_url, settings.redis_prefix, notice)  # type: ignore[arg-type]

    def db(self) -> sessionmaker[Session]:
        """The session factory of a migrated database with the configured plans in it."""
        if self._factory is None:
            from kiln.db.engine import make_engine, make_session_factory
            from kiln.db.migrate import upgrade
            from kiln.service.plans import ensure_plans

            settings = self.settings()
            upgrade(settings.database_url)
            self._factory = make_session_factory(make_engine(settings.database_url))
            ensure_plans(self._factory, settings.plans)
        return self._factory
