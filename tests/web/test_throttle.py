"""The sign-in throttle on `limits`: per name and per address, in memory and on the real Redis.

Redis runs when `KILN_TEST_REDIS_URL` is set (e.g. redis://127.0.0.1:6379/0); when it is set but
unreachable the test fails — it never skips. Each test writes under a namespace of its own, and its
keys expire with their one-second window.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from kiln.config import Settings, load_settings
from kiln.web.throttle import SignInThrottle

REDIS_ENV = "KILN_TEST_REDIS_URL"


@pytest.fixture(params=["memory", "redis"])
def storage_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    url = os.environ.get(REDIS_ENV)
    if not url:
        pytest.skip(f"{REDIS_ENV} is not set")
    if not SignInThrottle(url).reachable():
        pytest.fail(f"{REDIS_ENV}={url} is set but Redis does not answer")
    return url


def throttle(storage_url: str, namespace: str | None = None, **limits: int) -> SignInThrottle:
    limits = {"max_failures": 2, "window_s": 1, "max_failures_per_address": 3, **limits}
    return SignInThrottle(storage_url, namespace=namespace or f"kiln-test-{uuid.uuid4().hex}", **limits)


def test_a_name_waits_after_its_failures_until_the_oldest_leaves_the_window(storage_url: str) -> None:
    t = throttle(storage_url)
    t.failed("name:a", "addr:x")
    assert t.retry_after_s("name:a", "addr:x") == 0
    t.failed("name:a", "addr:x")
    wait_s = t.retry_after_s("name:a")
    assert 0 < wait_s <= 1
    assert t.retry_after_s("addr:x") == 0 and t.retry_after_s("name:b", "addr:y") == 0
    assert t.retry_after_s("name:a", "addr:y") == pytest.approx(wait_s, abs=0.05)  # any address
    time.sleep(wait_s + 0.01)  # the window is the thing under test: nothing to wait on but time
    assert t.retry_after_s("name:a", "addr:x") == 0


def test_an_address_has_its_own_higher_limit_and_a_success_forgets_only_the_name(storage_url: str) -> None:
    t = throttle(storage_url)
    for name in ("name:a", "name:b", "name:c"):
        t.failed(name, "addr:x")
    assert t.retry_after_s("name:d", "addr:x") > 0  # a fourth name from the same address waits
    assert t.retry_after_s("name:d", "addr:y") == 0
    t.failed("name:a", "addr:y")
    assert t.retry_after_s("name:a") > 0
    t.succeeded("name:a")
    assert t.retry_after_s("name:a", "addr:y") == 0
    assert t.retry_after_s("addr:x") > 0


def test_throttles_on_one_storage_share_their_counts(storage_url: str) -> None:
    """Two replicas on one Redis see each other's failures; `memory://` is per process by design."""
    namespace = f"kiln-test-{uuid.uuid4().hex}"
    first, second = throttle(storage_url, namespace), throttle(storage_url, namespace)
    first.failed("name:a")
    first.failed("name:a")
    shared = second.retry_after_s("name:a") > 0
    assert shared == storage_url.startswith("redis")


def test_the_setting_chooses_the_storage(storage_url: str, tmp_path: Path) -> None:
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path / 'kiln.db'}", data_dir=tmp_path, throttle_storage_url=storage_url
    )
    from kiln.web import install_web

    app = FastAPI()
    install_web(app, SimpleNamespace(settings=settings))  # type: ignore[arg-type]
    installed: SignInThrottle = app.state.kiln_sign_in_throttle
    assert installed.reachable()
    assert type(installed.storage).__name__ == ("RedisStorage" if storage_url != "memory://" else "MemoryStorage")


def test_the_setting_defaults_to_memory_and_takes_only_storage_uris() -> None:
    assert Settings.model_fields["throttle_storage_url"].default == "memory://"
    with pytest.raises(ValidationError):
        load_settings(throttle_storage_url="localhost:6379")
    with pytest.raises(ValueError, match="synchronous"):
        SignInThrottle("async+memory://")
