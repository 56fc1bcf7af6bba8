"""The app an API process serves: the HTTP API with the web UI on top (the one place that knows both)."""

from __future__ import annotations

from fastapi import FastAPI

from kiln.api.app import create_api_app, gate_refusals
from kiln.config import Settings
from kiln.service.clock import Clock
from kiln.web import install_web


def create_app(settings: Settings | None = None, *, clock: Clock | None = None) -> FastAPI:
    app = create_api_app(settings, clock=clock)
    install_web(app, app.state.kiln)
    gate_refusals(app)
    return app
