"""`metrics_bind`: a second listener in the API process that serves only /metrics (the same series,
the same `metrics_token` check), so Prometheus can scrape a private address while the API's public
port has no /metrics at all. It runs on the app's event loop and starts and stops with the app."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from kiln.api.errors import kiln_error_response
from kiln.api.routes.metrics import check_operator, exposition
from kiln.api.state import AppState
from kiln.errors import KilnError


def metrics_app(state: AppState) -> Starlette:
    async def metrics(request: Request) -> Response:
        try:
            check_operator(state, request.headers.get("authorization"))
        except KilnError as refused:
            return kiln_error_response(refused)
        return exposition(state)

    return Starlette(routes=[Route("/metrics", metrics, methods=["GET"])])


class _Listener(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the API's own server handles SIGINT/SIGTERM and stops the app, which stops this


def bind(address: str) -> socket.socket:
    """The listening socket for `host:port` (bound now, so a taken port fails the app's start)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError:
        sock.close()
        raise
    return sock


class MetricsListener:
    def __init__(self, state: AppState, address: str) -> None:
        self.sock = bind(address)
        self.server = _Listener(uvicorn.Config(metrics_app(state), log_level="warning", access_log=False,
                                               lifespan="off"))
        self._task: asyncio.Task[None] | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve(sockets=[self.sock]), name="kiln-metrics-listener")
        while not self.server.started and not self._task.done():
            await asyncio.sleep(0.01)  # uvicorn offers a flag, not an event
        if self._task.done():
            self._task.result()  # raises what stopped it

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        self.sock.close()
