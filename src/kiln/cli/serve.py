"""`kiln serve`: the API, the web UI and the workers in one process tree."""

from __future__ import annotations

from typing import Annotated

import typer

GRACEFUL_SHUTDOWN_S = 10


def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port (default 8000).")] = None,
) -> None:
    """Start Kiln: API + web UI + workers."""
    import uvicorn

    from kiln.api.app import create_app

    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = ctx.obj.settings(**overrides)
    ctx.obj.db()  # migrate before the first request
    app = create_app(settings)
    # Event streams and synchronous generations can outlive a shutdown by minutes: give them a few
    # seconds, then stop; unfinished jobs stay queued in the database for the next server.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
