"""The API's app factory: settings, database, registry and routes are built here, never at import time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from kiln import __version__
from kiln.api.body_limit import BodySizeLimit
from kiln.api.errors import install_error_handlers
from kiln.api.metrics_listener import MetricsListener
from kiln.api.openapi import install_openapi
from kiln.api.refusal_gate import RefusalGate
from kiln.api.routes import health, images, jobs, keys, metrics, models, usage, webhooks
from kiln.api.state import AppState
from kiln.config import Settings, load_settings
from kiln.service.clock import Clock


def create_api_app(
    settings: Settings | None = None,
    *,
    clock: Clock | None = None,
) -> FastAPI:
    """The API process's app: its routes and a link to the scheduler (a separate process, or in
    tests a `SchedulerHost` beside it), which runs the jobs. `kiln.app.create_app` adds the web UI."""
    settings = settings or load_settings()
    state = AppState.build(settings, clock=clock)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await state.start()
        listener = None
        try:
            if settings.metrics_bind:
                listener = MetricsListener(state, settings.metrics_bind)
                await listener.start()
            app.state.metrics_listener = listener  # tests read its address
            yield
        finally:
            if listener is not None:
                await listener.stop()
            await state.stop()

    app = FastAPI(title="Kiln", version=__version__, lifespan=lifespan)
    app.state.kiln = state
    install_error_handlers(app)
    install_openapi(app, state.registry)
    app.include_router(health.router)
    if not settings.metrics_bind:  # else /metrics is only on its own listener: 404 here
        app.include_router(metrics.router)
    app.include_router(models.router)
    app.include_router(images.router)
    app.include_router(usage.router)
    app.include_router(jobs.router)
    app.include_router(keys.router)
    app.include_router(webhooks.router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    return app


def gate_refusals(app: FastAPI) -> None:
    """Put the refusal gate outside every other layer (call it last: middleware added later wraps)."""
    app.add_middleware(RefusalGate, state=app.state.kiln)
