"""Prometheus: this API process's series (admission) and the scheduler's (engine, workers), which it
sends with its heartbeat; never the process-global registry."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kiln.api.deps import State

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text exposition."}})
async def metrics(state: State) -> Response:
    """Queue depth and wait per plan, images/s, batch sizes, GPU seconds per plan, refusals by reason
    (and GPU temperature/utilisation where NVML finds a GPU)."""
    scheduler = state.runner.status.metrics if state.runner.status is not None else b""
    return Response(generate_latest(state.metrics_registry) + scheduler, media_type=CONTENT_TYPE_LATEST)
