"""One Kiln server for the whole session serving a tiny random-weight pipeline of every family
(built once into a tmp dir), and an enterprise user to call it with.

One worker process loads each family's pipeline on its first batch and keeps it, so the families
share one server and one worker start.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from kiln.config import ModelSpec, load_settings
from models import tiny_pipelines

FAMILIES = list(tiny_pipelines.BUILDERS)
STEPS = 2


@dataclass
class FamilyServer:
    """A running Kiln (uvicorn in a thread) that httpx and the openai SDK talk to over TCP."""

    base_url: str
    app: Any

    @property
    def state(self) -> Any:
        return self.app.state.kiln

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120)

    def openai(self, key: str) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=f"{self.base_url}/v1", api_key=key, max_retries=0, timeout=120)


def model_name(family: str) -> str:
    return f"tiny-{family}"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-pipelines")


@pytest.fixture(scope="session")
def tiny_paths(tiny_root: Path) -> dict[str, Path]:
    """Every tiny pipeline, built once per session (a second or two for all of them)."""
    import torch

    torch.set_num_threads(2)
    return {family: tiny_pipelines.build(family, tiny_root) for family in FAMILIES}


def tiny_spec(family: str, path: Path, **extra: Any) -> ModelSpec:
    native = tiny_pipelines.NATIVE_OVERRIDE.get(family)
    return ModelSpec(path=path, steps=STEPS, native_size=native, **extra)


@pytest.fixture(scope="session")
def family_server(
    tiny_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FamilyServer]:
    import uvicorn

    from engine_server import free_port

    from kiln.app import create_app
    from kiln.db.migrate import upgrade
    from kiln.service.scheduler_host import SchedulerHost

    root = tmp_path_factory.mktemp("family-server")
    database_url = f"sqlite:///{root / 'kiln.db'}"
    upgrade(database_url)
    models = {
        model_name(f): tiny_spec(f, p, sizes=["48x32"] if f == "sdxl" else []) for f, p in tiny_paths.items()
    }
    settings = load_settings(
        database_url=database_url,
        data_dir=root,
        images_dir=root / "images",
        models=models,
        default_model=model_name("sd"),
        model_aliases={},
        preview_every_steps=1,
        max_batch_wait_s=0.2,
        live_settings_poll_s=0.5,
        scheduler_url=f"tcp://127.0.0.1:{free_port()}",
        scheduler_events_url=f"tcp://127.0.0.1:{free_port()}",
        scheduler_timeout_s=5.0,
    )
    scheduler = SchedulerHost(settings)  # the engine and its workers, beside the API as in `kiln serve`
    scheduler.start_in_thread()
    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False))

    async def serve() -> None:
        await server.serve(sockets=[sock])

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the family server failed to start")
        threading.Event().wait(0.02)
    host, port = sock.getsockname()
    deadline = time.monotonic() + 30
    while not app.state.kiln.runner.available:  # the scheduler's first heartbeat
        assert time.monotonic() < deadline, "no scheduler heartbeat"
        threading.Event().wait(0.05)
    yield FamilyServer(f"http://{host}:{port}", app)
    server.should_exit = True
    thread.join(30)
    scheduler.stop_thread()


@pytest.fixture(scope="session")
def family_key(family_server: FamilyServer) -> str:
    from kiln.service import accounts

    db = family_server.state.db
    account = accounts.create_user(db, "families", "enterprise")
    key, _ = accounts.create_key(db, account.name)
    return key
