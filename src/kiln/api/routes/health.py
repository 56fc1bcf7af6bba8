"""Liveness and readiness: cheap, no auth, answered under any load."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, text

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """The database, Redis (when `redis_url` is set: reachable and subscribed to the other replicas'
    notices), the scheduler (and its workers) and this process: 200 when all can serve, else 503.
    The body names each check and the scheduler's worker count."""
    state = request.app.state.kiln
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(asyncio.to_thread(_ping, state.engine), 5)
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - readiness reports, never raises
        checks["database"] = f"error: {type(exc).__name__}"
    if state.bus is not None:
        reachable = await state.bus.ping()
        checks["redis"] = "ok" if reachable and state.bus.subscribed.is_set() else (
            "subscribing" if reachable else "unreachable")
    checks["server"] = "ok" if state.ready else "starting"
    status = state.runner.status
    checks["scheduler"] = "ok" if state.runner.available else "unavailable"
    if status is not None and state.runner.available:
        checks["workers"] = "ok" if status.workers > 0 else "none"
    ok = all(v == "ok" for v in checks.values())
    workers = status.workers if status is not None and state.runner.available else 0
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks, "workers": workers},
                        status_code=200 if ok else 503)
