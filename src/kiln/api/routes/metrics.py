"""Prometheus: this API process's series (admission) and the scheduler's (engine, workers), which it
sends with its heartbeat; never the process-global registry. Behind `metrics_token` when it is set,
and on the API's port unless `metrics_bind` gives /metrics a listener of its own (`metrics_listener`)."""

from __future__ import annotations

import secrets
from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kiln.api.deps import State
from kiln.api.schemas import error_responses
from kiln.api.state import AppState
from kiln.errors import AuthenticationFailed

router = APIRouter(tags=["health"])


def exposition(state: AppState) -> Response:
    """The text Prometheus scrapes: this process's registry, then the scheduler's last report."""
    scheduler = state.runner.status.metrics if state.runner.status is not None else b""
    return Response(generate_latest(state.metrics_registry) + scheduler, media_type=CONTENT_TYPE_LATEST)


def check_operator(state: AppState, authorization: str | None) -> None:
    """401 unless `metrics_token` is unset or `authorization` is `Bearer <metrics_token>`."""
    token = state.settings.metrics_token
    if token is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(),
                                                                token.get_secret_value().encode()):
        refused = AuthenticationFailed("/metrics needs the operator's token: 'Authorization: Bearer …'.")
        refused.headers = {"WWW-Authenticate": 'Bearer realm="metrics"'}  # type: ignore[attr-defined]
        raise refused


async def _operator_only(request: Request, state: State) -> None:
    check_operator(state, request.headers.get("authorization"))


@router.get("/metrics", response_class=Response, dependencies=[Depends(_operator_only)], responses={
    200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text exposition."},
    **error_responses(401)})
async def metrics(state: State) -> Response:
    """Queue depth and wait per plan, images/s, batch sizes, GPU seconds per plan, refusals by reason
    (and GPU temperature/utilisation where NVML finds a GPU). Needs `metrics_token` when one is set."""
    return exposition(state)
