"""bench/wrk/flood.lua and its harness side: the status mix and the Retry-After check come out of a real
wrk run against a tiny local server that answers by path (skipped where wrk is not installed)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from bench.harness import Wrk, WrkRequest, WrkRun, median_run, spread


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        headers: dict[str, str] = {}
        body = b"{}"
        if self.path == "/quota":
            status, headers, body = 429, {"Retry-After": "60"}, b'{"error": {"code": "quota_exceeded"}}'
        elif self.path == "/no-retry-after":
            status = 429
        elif self.headers.get("authorization", "").startswith("Bearer kiln-"):
            status = 200
        else:
            status = 401
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.skipif(not shutil.which("wrk"), reason="wrk is not installed")
def test_counts_every_status_and_each_429_without_retry_after(url: str, tmp_path: Path) -> None:
    requests = [
        WrkRequest("POST", "/quota", "kiln-spent", '{"prompt": "x"}'),
        WrkRequest("GET", "/read", "@random"),  # random keys are shaped like Kiln's: 200 here
        WrkRequest("GET", "/read", "-"),  # no key: 401
        WrkRequest("GET", "/no-retry-after", "kiln-x"),
    ]
    run = Wrk(url, requests, connections=4, duration_s=1, cpu=None, folder=tmp_path).run()
    assert run.requests == sum(run.status.values()) > 20
    assert set(run.status) == {200, 401, 429}
    assert run.status[429] == run.quota_exceeded + run.retry_after_missing
    assert run.quota_exceeded > 0 and run.retry_after_missing > 0
    assert 0 < run.p50_ms <= run.p99_ms <= run.max_ms
    assert run.rate_of(200, 401, 429) == pytest.approx(run.rate)


def _run(rate: float, p99_ms: float) -> WrkRun:
    return WrkRun(requests=round(rate * 10), duration_s=10.0, connections=16, status={200: round(rate * 10)},
                  retry_after_missing=0, quota_exceeded=0, errors={}, p50_ms=p99_ms / 2, p90_ms=p99_ms,
                  p99_ms=p99_ms, max_ms=p99_ms, mean_ms=800.0)


def test_median_run_keeps_latencies_with_their_rate() -> None:
    runs = [_run(300, 9), _run(100, 30), _run(200, 12)]
    assert median_run(runs).p99_ms == 12
    assert median_run(runs[:2]).rate == 100  # the lower middle of an even count
    assert spread([r.rate for r in runs]) == "200 (100–300)"


def test_closed_loop_rate_is_littles_law() -> None:
    assert _run(15, 1000).closed_loop_rate(200) == pytest.approx(16 / 0.8)


def test_a_tab_in_a_request_is_refused() -> None:
    with pytest.raises(ValueError):
        WrkRequest("POST", "/v1/jobs", "k", '{"prompt": "a\tb"}').line()


def test_one_core_runs_unpinned(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import harness

    monkeypatch.setattr(harness.os, "sched_getaffinity", lambda _pid: {3})
    assert harness.pinning() == (None, None)
    assert harness.pinned(None, ["wrk"]) == ["wrk"]
    monkeypatch.setattr(harness.os, "sched_getaffinity", lambda _pid: {5, 2, 7})
    assert harness.pinning() == ("2", "5")
    assert harness.pinned("5", ["wrk"]) == ["taskset", "-c", "5", "wrk"]
