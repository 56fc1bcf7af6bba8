"""No web page holds the server's event loop: every page, loaded by several clients at once while a
loop-lag probe ticks on the real server's loop, leaves the loop's lag under a bound.

The clients run in a process of their own (loop_lag_clients.py). The sharp bound is on the loop's own
CPU between two ticks (`max_busy_s`): wall-clock lag on a shared 2-core machine also holds time the
process was not scheduled or a thread-pool thread had the GIL, which no handler can help. Measured on
2 busy cores with this seed: with the database calls on the loop (the web handlers before issue 10)
the loop was busy 112–134 ms at a stretch (wall lag 631–652 ms); with them in the thread pool, busy
4–11 ms (wall lag 96–734 ms, the machine's other load). The wall bound is a backstop for waits that
use no CPU (a lock taken on the loop).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from web_helpers import run_async

from kiln.looplag import watching
from kiln.service import accounts
from kiln.web.throttle import SignInThrottle

CLIENTS = Path(__file__).with_name("loop_lag_clients.py")
MAX_BUSY_S = 0.05
"""Several requests' parsing and sending back to back fit; one page's queries and rendering do not."""
MAX_LAG_S = 2.0
LOAD_S = 3.0


def seed(db: Any, user_id: str, users: int = 1000, conversations: int = 100) -> None:
    """A lived-in server: the dashboard lists hundreds of users and keys, the chat a full sidebar."""
    from kiln.db.models import ApiKey, User
    from kiln.db.web_models import Conversation

    with db.begin() as session:
        rows = [User(name=f"someone{i}", plan_name="free") for i in range(users)]
        session.add_all(rows)
        session.flush()
        session.add_all(
            ApiKey(user_id=u.id, prefix=f"kiln-seed{i:05d}", key_hash=f"{i:064d}", label="seeded")
            for i, u in enumerate(rows)
        )
        session.add_all(Conversation(user_id=user_id, title=f"chat {i}") for i in range(conversations))


def test_no_web_page_holds_the_event_loop(web: Any, people: Any) -> None:
    ann = people("ann", plan="plus")
    people("ops", plan="plus", admin=True)
    seed(web.state.db, accounts.get_user(web.state.db, "ann").user_id)
    key, _ = accounts.create_key(web.state.db, "ann")
    with httpx.Client(base_url=web.base_url, headers={"Authorization": f"Bearer {key}"}) as api:
        job = api.post("/v1/jobs", json={"prompt": "a red circle"})
        assert job.status_code in (200, 201, 202), job.text
    # right and wrong passwords, as often as the load likes: the throttle is not what is measured
    web.app.state.kiln_sign_in_throttle = SignInThrottle(max_failures=10**6, max_failures_per_address=10**6)
    config = {
        "base_url": web.base_url,
        "duration_s": LOAD_S,
        "user": ann.name,
        "admin": "ops",
        "password": ann.password,
        "job_id": job.json()["id"],
        "clients": 4,
    }
    # The test process's own heap (the browser driver, earlier tests) is not the server's: frozen, a
    # full collection during the load scans only what the load made (one was 0.57 s on the loop).
    gc.collect()
    gc.freeze()
    try:
        with watching(web.loop, interval_s=0.005) as probe:
            load = subprocess.run(
                [sys.executable, str(CLIENTS), json.dumps(config)], capture_output=True, text=True, timeout=120
            )
    finally:
        gc.unfreeze()
    assert load.returncode == 0, load.stderr[-3000:]
    result = json.loads(load.stdout.strip().splitlines()[-1])
    counts = result["counts"]
    assert result["errors"] == [], result
    expected = {
        "chat 200", "conversation 200", "new conversation 201", "message 201", "keys 200",
        "admin 200", "stats 200", "wrong password 401", "right password 303",
    }
    assert set(counts) == expected, counts
    print(f"loop lag ≤ {probe.max_lag_s * 1000:.0f} ms, busy ≤ {probe.max_busy_s * 1000:.0f} ms, {counts}")
    assert probe.ticks > 10
    assert probe.max_busy_s < MAX_BUSY_S, (
        f"the event loop's thread ran callbacks for {probe.max_busy_s * 1000:.0f} ms at a stretch "
        f"(bound {MAX_BUSY_S * 1000:.0f} ms) while the web pages were loaded: {counts}"
    )
    assert probe.max_lag_s < MAX_LAG_S, f"the event loop woke {probe.max_lag_s:.2f} s late"


def test_the_probe_tells_a_held_loop_from_a_busy_one() -> None:
    """A callback that sleeps shows as lag; one that computes shows as lag and busy time."""
    import asyncio
    import time

    from prometheus_client import CollectorRegistry, generate_latest

    from kiln.looplag import LoopLagProbe

    async def main() -> tuple[LoopLagProbe, bytes]:
        registry = CollectorRegistry()
        probe = LoopLagProbe(registry, interval_s=0.002)
        probe.start()
        while probe.ticks < 3:
            await asyncio.sleep(0)
        time.sleep(0.15)  # blocking: lag, no CPU
        await asyncio.sleep(0.01)
        assert probe.max_lag_s >= 0.14 and probe.max_busy_s < 0.1, (probe.max_lag_s, probe.max_busy_s)
        spin_until = time.thread_time() + 0.12
        while time.thread_time() < spin_until:  # computing on the loop: busy
            pass
        await asyncio.sleep(0.01)
        await probe.stop()
        return probe, generate_latest(registry)

    probe, exported = run_async(main())
    assert probe.max_busy_s >= 0.12
    assert b"kiln_event_loop_lag_seconds_bucket" in exported and b"kiln_event_loop_busy_seconds" in exported
    assert b"kiln_event_loop_lag_max_seconds" in exported


def test_every_web_handler_and_dependency_is_sync() -> None:
    """The rule the timing test samples, checked for every route: a web handler that reads the
    database is a plain `def`, so FastAPI runs it (and its dependencies) in the thread pool."""
    import inspect

    from fastapi.routing import APIRoute

    from kiln.web import admin, chat, signin

    def calls(dependant: Any) -> Any:
        yield dependant.call
        for sub in dependant.dependencies:
            yield from calls(sub)

    routes = [r for router in (admin.router, chat.router, signin.router) for r in router.routes]
    assert len(routes) >= 15
    on_the_loop = sorted(
        f"{route.path} {getattr(call, '__name__', call)}"
        for route in routes
        if isinstance(route, APIRoute)
        for call in calls(route.dependant)
        if call is not None and inspect.iscoroutinefunction(call)
    )
    assert on_the_loop == [], f"async web handlers (their database calls would run on the loop): {on_the_loop}"
