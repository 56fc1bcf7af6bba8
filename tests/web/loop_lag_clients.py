"""Browser-shaped load for test_loop_lag.py, run in a process of its own so that its threads never
compete with the server's event loop for the test process's GIL.

`python loop_lag_clients.py '{"base_url": …, "duration_s": …, "user": …, "admin": …, "password": …,
"job_id": …, "clients": …}'` prints one JSON line: status counts per page.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections import Counter

import httpx

_CSRF = re.compile(r'name="csrf-token" content="([^"]+)"')


def _csrf(html: str) -> str:
    match = _CSRF.search(html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def _sign_in(client: httpx.Client, name: str, password: str) -> tuple[int, str]:
    """POST /login as a browser would (the form's CSRF token first); returns its status and the next
    page's CSRF token."""
    token = _csrf(client.get("/login").text)
    response = client.post("/login", data={"username": name, "password": password, "csrf_token": token})
    return response.status_code, (_csrf(client.get("/").text) if response.status_code == 303 else token)


def _browser(config: dict, counts: Counter, start: threading.Barrier, deadline: list[float]) -> None:
    """A signed-in user: the chat, one conversation, a new one, a message, the keys page."""
    with httpx.Client(base_url=config["base_url"], timeout=60) as client:
        status, csrf = _sign_in(client, config["user"], config["password"])
        assert status == 303, status
        headers = {"X-CSRF-Token": csrf}
        conversation = client.post("/web/api/conversations", json={"title": "load"}, headers=headers).json()
        start.wait()
        while time.monotonic() < deadline[0]:
            counts[f"chat {client.get('/').status_code}"] += 1
            counts[f"conversation {client.get(conversation['url']).status_code}"] += 1
            created = client.post("/web/api/conversations", json={"title": "x"}, headers=headers)
            counts[f"new conversation {created.status_code}"] += 1
            message = client.post(
                f"/web/api/conversations/{conversation['id']}/messages",
                json={"text": "a red circle", "job_id": config["job_id"]},
                headers=headers,
            )
            counts[f"message {message.status_code}"] += 1
            counts[f"keys {client.get('/keys').status_code}"] += 1


def _operator(config: dict, counts: Counter, start: threading.Barrier, deadline: list[float]) -> None:
    """An admin watching the dashboard and its stats poll."""
    with httpx.Client(base_url=config["base_url"], timeout=60) as client:
        status, _ = _sign_in(client, config["admin"], config["password"])
        assert status == 303, status
        start.wait()
        while time.monotonic() < deadline[0]:
            counts[f"admin {client.get('/admin').status_code}"] += 1
            counts[f"stats {client.get('/admin/api/stats').status_code}"] += 1


def _signer(config: dict, counts: Counter, start: threading.Barrier, deadline: list[float]) -> None:
    """Someone signing in: a wrong password, then the right one (argon2 and a new session each)."""
    with httpx.Client(base_url=config["base_url"], timeout=60) as client:
        start.wait()
        while time.monotonic() < deadline[0]:
            client.cookies.clear()
            counts[f"wrong password {_sign_in(client, config['user'], 'not the password')[0]}"] += 1
            client.cookies.clear()
            counts[f"right password {_sign_in(client, config['user'], config['password'])[0]}"] += 1


def main() -> None:
    config = json.loads(sys.argv[1])
    roles = [_browser] * config["clients"] + [_operator, _signer]
    counts: Counter = Counter()
    deadline = [0.0]

    def set_deadline() -> None:
        deadline[0] = time.monotonic() + config["duration_s"]

    # every client signed in first, then all start together and stop at the same deadline
    start = threading.Barrier(len(roles) + 1, action=set_deadline)
    errors: list[BaseException] = []

    def run(role) -> None:  # type: ignore[no-untyped-def]
        try:
            role(config, counts, start, deadline)
        except BaseException as exc:
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=run, args=(role,)) for role in roles]
    for thread in threads:
        thread.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass
    for thread in threads:
        thread.join()
    print(json.dumps({"counts": counts, "errors": [repr(e) for e in errors]}))


if __name__ == "__main__":
    main()
