"""The app factory: settings, database, registry and routes are built here, never at import time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from kiln import __version__
from kiln.api.errors import install_error_handlers
from kiln.api.routes import health, models
from kiln.api.state import AppState
from kiln.config import Settings, load_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    state = AppState.build(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="Kiln", version=__version__, lifespan=lifespan)
    app.state.kiln = state
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(models.router)
    return app
