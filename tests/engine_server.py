"""Helpers for tests that drive the engine through a real server: fake-model settings (slow, held
back, crashing), and a reader of a job's server-sent events."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from kiln.config import ModelSpec, Settings

FAKE_LOADER = "kiln.testing:load_fake_pipeline"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine_settings(
    settings: Settings, tmp_path: Path, *, steps: int = 4, step_s: float = 0.0, hold: bool = False,
    **overrides: Any,
) -> Settings:
    """The test settings with the fake model drawing `steps` steps of `step_s` each. `hold`: workers
    stay loading (every job stays queued) until `release(tmp_path)`."""
    options: dict[str, float | int | str] = {"step_s": step_s}
    if hold:
        options["hold_until"] = str(tmp_path / "release-workers")
    model = ModelSpec(path=tmp_path / "model", loader=FAKE_LOADER, native_size=64, steps=steps, options=options)
    return settings.model_copy(update={"models": {"fake": model}, "max_batch_wait_s": 0.0, **overrides})


def release(tmp_path: Path) -> None:
    (tmp_path / "release-workers").touch()


def follow(http: httpx.Client, job_id: str, last_event_id: int | None = None) -> Iterator[dict[str, Any]]:
    """The job's events as {id, event, data}, until the server ends the stream (or the caller stops)."""
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code in (200, 204), response.read()
        if response.status_code == 204:
            return
        assert response.headers["content-type"].startswith("text/event-stream")
        current: dict[str, Any] = {}
        for line in response.iter_lines():
            if line.startswith("id: "):
                current["id"] = int(line[4:])
            elif line.startswith("event: "):
                current["event"] = line[7:]
            elif line.startswith("data: "):
                current["data"] = json.loads(line[6:])
            elif line == "" and "event" in current:
                yield current
                current = {}


def events_until_end(http: httpx.Client, job_id: str, last_event_id: int | None = None) -> list[dict[str, Any]]:
    return list(follow(http, job_id, last_event_id))
