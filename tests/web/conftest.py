"""Browser tests: a real Kiln (uvicorn in a thread, the fake pipeline) driven by Debian's headless
Chromium through Playwright. Only SQLite here; the chat's tables are checked on PostgreSQL by
test_conversations.py. Every wait is on a selector or an event, never a sleep.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from web_helpers import sign_in

from kiln.config import ModelSpec, Settings, load_settings

CHROMIUM = os.environ.get("KILN_TEST_CHROMIUM", "/usr/bin/chromium")
PASSWORD = "correct horse battery"


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    from kiln.db.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'kiln.db'}"
    upgrade(url)
    return url


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """The fake pipeline drawing 12 steps of 50 ms each: slow enough to watch, fast enough to test."""
    (tmp_path / "model").mkdir(exist_ok=True)
    fake = ModelSpec(
        path=tmp_path / "model",
        loader="kiln.testing:load_fake_pipeline",
        native_size=64,
        steps=12,
        options={"step_s": 0.05},
    )
    return load_settings(
        database_url=database_url,
        data_dir=tmp_path,
        images_dir=tmp_path / "images",
        models={"fake": fake},
        default_model="fake",
        model_aliases={"gpt-image-1": "fake", "dall-e-3": "fake", "dall-e-2": "fake"},
        live_settings_poll_s=0.5,
    )


@dataclass
class Person:
    name: str
    password: str = PASSWORD


@pytest.fixture
def web(start_server: Callable[..., Any], settings: Settings) -> Any:
    """A running Kiln with the web UI mounted."""
    return start_server(settings)


@pytest.fixture
def people(web: Any) -> Callable[..., Person]:
    from kiln.service import accounts

    def make(name: str, plan: str = "free", admin: bool = False) -> Person:
        accounts.create_user(web.state.db, name, plan, is_admin=admin, password=PASSWORD)
        return Person(name)

    return make


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.fail(f"Chromium not found at {CHROMIUM}: run `make test` (it installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser: Any, web: Any) -> Iterator[Callable[..., Any]]:
    """`open_page(person, width=1280)`: a fresh browser context, signed in as `person` (or not)."""
    contexts: list[Any] = []

    def open_(person: Person | None = None, width: int = 1280, height: int = 800) -> Any:
        context = browser.new_context(
            viewport={"width": width, "height": height}, base_url=web.base_url, device_scale_factor=1
        )
        context.set_default_timeout(15_000)
        contexts.append(context)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
        page.js_errors = errors  # type: ignore[attr-defined]
        if person is not None:
            sign_in(page, person)
        return page

    yield open_
    for context in contexts:
        context.close()
