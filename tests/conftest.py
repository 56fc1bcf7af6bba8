"""Shared fixtures: a fresh database per test on SQLite and PostgreSQL, fake-pipeline settings, and a
real Kiln server (uvicorn in a thread) that the openai SDK and httpx talk to over TCP.

PostgreSQL runs when `KILN_TEST_DATABASE_URL` is set (each test gets its own schema, dropped after);
when it is set but unreachable the test fails — it never skips.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

from engine_server import free_port

from kiln.config import ModelSpec, Settings, load_settings
from kiln.service.clock import FakeClock

POSTGRES_ENV = "KILN_TEST_DATABASE_URL"
FAKE_LOADER = "kiln.testing:load_fake_pipeline"


def _postgres_schema_url(base_url: str) -> Iterator[str]:
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:16]}"
    plain = make_url(base_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    separator = "&" if "?" in base_url else "?"
    try:
        yield f"{base_url}{separator}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(plain, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(autouse=True)
def _no_borrowed_running_loop(request: pytest.FixtureRequest) -> Iterator[None]:
    """Outside tests/web, the main thread runs no event loop of Playwright's. Its sync API (the
    session's Chromium) marks its loop as the main thread's running loop for as long as it lives, and
    asyncio.run in any test after the first browser test would refuse to start; the mark is lifted
    for the test and put back after it."""
    borrowed = asyncio.events._get_running_loop()
    if borrowed is None or "tests/web/" in request.node.nodeid:
        yield
        return
    asyncio.events._set_running_loop(None)
    try:
        yield
    finally:
        asyncio.events._set_running_loop(borrowed)


@pytest.fixture(params=["sqlite", "postgres"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, unmigrated database: a SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'kiln.db'}"
        return
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"{POSTGRES_ENV} is not set")
    yield from _postgres_schema_url(base)


@pytest.fixture
def database_url(empty_database_url: str) -> str:
    """A fresh database migrated to the latest schema."""
    from kiln.db.migrate import upgrade

    upgrade(empty_database_url)
    return empty_database_url


def fake_models(model_dir: Path, **spec: Any) -> dict[str, ModelSpec]:
    return {"fake": ModelSpec(path=model_dir, loader=FAKE_LOADER, native_size=64, steps=4, **spec)}


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """Settings on the test database with the fake pipeline as the only (default) model."""
    (tmp_path / "model").mkdir(exist_ok=True)
    return load_settings(
        database_url=database_url,
        data_dir=tmp_path,
        images_dir=tmp_path / "images",
        models=fake_models(tmp_path / "model"),
        default_model="fake",
        model_aliases={"gpt-image-1": "fake", "dall-e-3": "fake", "dall-e-2": "fake"},
        live_settings_poll_s=0.5,
        scheduler_timeout_s=5.0,  # two busy cores can delay a heartbeat by a second or more
    )


@pytest.fixture
def db(settings: Settings):  # type: ignore[no-untyped-def]
    """A session factory on the test database, with the configured plans created."""
    from kiln.db.engine import make_engine, make_session_factory
    from kiln.service.plans import ensure_plans

    engine = make_engine(settings.database_url)
    factory = make_session_factory(engine)
    ensure_plans(factory, settings.plans)
    yield factory
    engine.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(dt.datetime(2026, 3, 14, 12, 0, tzinfo=dt.UTC))


@dataclass
class User:
    name: str
    user_id: str
    key: str


@pytest.fixture
def make_user(db) -> Callable[..., User]:  # type: ignore[no-untyped-def]
    """Create a user with an API key: `make_user("ann", plan="plus")`."""
    from kiln.service import accounts

    def make(name: str | None = None, plan: str = "free") -> User:
        account = accounts.create_user(db, name or f"u{uuid.uuid4().hex[:8]}", plan)
        key, _ = accounts.create_key(db, account.name)
        return User(account.name, account.user_id, key)

    return make


def free_port_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class Server:
    base_url: str
    app: Any
    loop: asyncio.AbstractEventLoop
    uvicorn: Any = None
    thread: threading.Thread | None = None
    scheduler: Any = None
    """The `SchedulerHost` started with it (engine, executor), if any."""

    @property
    def state(self) -> Any:
        return self.app.state.kiln

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60)

    def openai(self, key: str) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=f"{self.base_url}/v1", api_key=key, max_retries=0, timeout=60)

    def call(self, coro: Any, timeout_s: float = 30) -> Any:
        """Run a coroutine on the server's event loop (e.g. to drive its runner) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self) -> None:
        """Shut the server down as `kiln serve` does on SIGTERM (lifespan shutdown included), and
        its scheduler, which hands its unfinished jobs back."""
        self.uvicorn.should_exit = True
        assert self.thread is not None
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not stop"
        if self.scheduler is not None:
            self.scheduler.stop_thread()


def with_scheduler_ports(settings: Settings) -> Settings:
    """Settings whose scheduler channel listens on two free local ports."""
    return settings.model_copy(update={
        "scheduler_url": f"tcp://127.0.0.1:{free_port()}",
        "scheduler_events_url": f"tcp://127.0.0.1:{free_port()}",
    })


@pytest.fixture
def start_scheduler(database_url: str) -> Iterator[Callable[..., Any]]:
    """Start schedulers (engine, executor, workers) on threads of their own: `start_scheduler(settings)`.
    (It asks for the database fixture so that they stop before the test's database is dropped.)"""
    from kiln.service.scheduler_host import SchedulerHost

    running: list[SchedulerHost] = []

    def start(settings: Settings) -> SchedulerHost:
        host = SchedulerHost(settings)
        host.start_in_thread()
        running.append(host)
        return host

    yield start
    for host in running:
        host.stop_thread()


@pytest.fixture
def start_server(start_scheduler: Callable[..., Any]) -> Iterator[Callable[..., Server]]:
    """Start Kiln servers: a scheduler and an API process's app (uvicorn) on threads of their own,
    talking over the real channel: `start_server(settings, clock=…)`; `scheduler=False` starts the
    API alone (its settings must name a scheduler started elsewhere)."""
    import uvicorn

    from kiln.app import create_app

    running: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(settings: Settings, *, scheduler: bool = True, wait_for_scheduler: bool = True,
              **kwargs: Any) -> Server:
        host = None
        if scheduler:
            settings = with_scheduler_ports(settings)
            host = start_scheduler(settings)
        app = create_app(settings, **kwargs)
        sock = free_port_socket()
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False))
        loops: list[asyncio.AbstractEventLoop] = []
        started = threading.Event()

        async def serve() -> None:
            loops.append(asyncio.get_running_loop())
            started.set()
            await server.serve(sockets=[sock])

        thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
        thread.start()
        running.append((server, thread))
        assert started.wait(10)
        while not server.started:  # uvicorn offers a flag, not an event
            if not thread.is_alive():
                raise RuntimeError("the test server failed to start")
            threading.Event().wait(0.01)
        host_name, port = sock.getsockname()
        result = Server(f"http://{host_name}:{port}", app, loops[0], server, thread, scheduler=host)
        if wait_for_scheduler and (scheduler or settings.scheduler_url):
            assert result.call(app.state.kiln.runner.wait_available(30), 40), "no scheduler heartbeat"
        return result

    yield start
    for server, thread in running:
        server.should_exit = True
    for server, thread in running:
        thread.join(15)


@pytest.fixture
def server(start_server: Callable[..., Server], settings: Settings, clock: FakeClock) -> Server:
    """A running Kiln on the test database, with the fake clock."""
    return start_server(settings, clock=clock)
