"""Two real `kiln serve` processes on one database race for a user's last free image: exactly one
request gets it, the other 49 get an honest 429 with Retry-After."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from kiln.db.models import QuotaUsage
from kiln.service.quota import quota_day


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(tmp_path: Path, database_url: str) -> Path:
    (tmp_path / "model").mkdir(exist_ok=True)
    config = tmp_path / "serve.toml"
    config.write_text(
        f'database_url = "{database_url}"\n'
        f'data_dir = "{tmp_path}"\n'
        f'images_dir = "{tmp_path / "images"}"\n'
        'default_model = "fake"\n'
        'model_aliases = { "gpt-image-1" = "fake" }\n'
        "[models.fake]\n"
        f'path = "{tmp_path / "model"}"\n'
        'loader = "kiln.testing:load_fake_pipeline"\n'
        "native_size = 64\n"
        "steps = 2\n"
    )
    return config


@pytest.fixture
def two_servers(settings, tmp_path):  # type: ignore[no-untyped-def]
    config = _config(tmp_path, settings.database_url)
    processes, urls = [], []
    for _ in range(2):
        port = _free_port()
        channel = {"KILN_SCHEDULER_URL": f"tcp://127.0.0.1:{_free_port()}",
                   "KILN_SCHEDULER_EVENTS_URL": f"tcp://127.0.0.1:{_free_port()}"}
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "kiln", "--config", str(config), "serve", "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **channel},
        ))
        urls.append(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        for process, url in zip(processes, urls, strict=True):
            while True:  # readiness is a state the server reports; ask for it until it says so
                assert process.poll() is None, process.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "kiln serve did not become ready"
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(20)


def test_the_last_free_image_raced_by_50_requests_across_two_servers(two_servers, db, make_user) -> None:
    ann = make_user("ann")  # the free plan: 3 images a day, one job at a time
    with db.begin() as session:
        session.add(QuotaUsage(user_id=ann.user_id, day=quota_day(dt.datetime.now(dt.UTC)), used=2))
    start = threading.Barrier(50)

    def attempt(i: int) -> httpx.Response:
        with httpx.Client(base_url=two_servers[i % 2], timeout=60,
                          headers={"Authorization": f"Bearer {ann.key}"}) as http:
            start.wait()
            return http.post("/v1/images/generations", json={"prompt": f"cat {i}"})

    with ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(attempt, range(50)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [429] * 49, [r.text for r in responses if r.status_code not in (200, 429)]
    for refused in (r for r in responses if r.status_code == 429):
        assert refused.json()["error"]["code"] == "quota_exceeded"
        assert 0 < int(refused.headers["Retry-After"]) <= 86400
        assert refused.headers["x-ratelimit-remaining-images"] == "0"
    with httpx.Client(base_url=two_servers[1], headers={"Authorization": f"Bearer {ann.key}"}) as http:
        assert http.get("/v1/usage").json()["used"] == 3
