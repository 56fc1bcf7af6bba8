"""A real webhook receiver for tests: an HTTP server on a free local port, on a thread of its own,
that verifies every delivery's signature with `standardwebhooks` and records what arrived.

`answer` decides each reply (status, headers) from the request, so a test can make the receiver
down (503, or not listening at all until `start()`), gone (410) or fine (204)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    """What the receiver answered."""
    verified: bool
    payload: dict[str, Any] | None


@dataclass
class Receiver:
    port: int
    secrets: dict[str, str] = field(default_factory=dict)
    """The secret to verify each path's deliveries with (the path's user's)."""
    answer: Callable[[str, dict[str, str]], tuple[int, dict[str, str]]] = lambda path, headers: (204, {})
    received: list[Delivery] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _server: ThreadingHTTPServer | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, extra = receiver.answer(self.path, headers)
                verified, payload = False, None
                secret = receiver.secrets.get(self.path)
                if secret is not None:
                    try:
                        payload = Webhook(secret).verify(body, headers)
                        verified = True
                    except WebhookVerificationError:
                        payload = json.loads(body)
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()
                with receiver._changed:
                    receiver.received.append(Delivery(self.path, headers, body, status, verified, payload))
                    receiver._changed.notify_all()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wait_for(self, condition: Callable[[list[Delivery]], bool], timeout_s: float = 30.0) -> list[Delivery]:
        """Wait until `condition(received)` holds; the deliveries so far (AssertionError on timeout)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not condition(self.received):
                left = deadline - time.monotonic()
                seen = [(d.path, d.status, d.payload and d.payload["type"]) for d in self.received]
                assert left > 0, f"timed out; received: {seen}"
                self._changed.wait(left)
            return list(self.received)

    def accepted(self, path: str | None = None) -> list[Delivery]:
        """The deliveries answered with a 2xx (to `path`)."""
        return [d for d in self.received if 200 <= d.status < 300 and (path is None or d.path == path)]
