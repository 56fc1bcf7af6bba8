"""Two API replicas and one scheduler on one database, sharing a real Redis (`KILN_TEST_REDIS_URL`):
as `kiln serve` processes, a job submitted on one is followed, resumed and fetched on the other; as
two apps in this process (each its own memory and event loop, so memory can be looked at), a revoked key, a plan change and a spent free quota reach the other replica within a
second (the database polls are set to a minute here, so only Redis can carry them), and a replica
whose subscription dropped reads what it missed; the sign-in throttle counts across replicas; and a
shared Redis client whose calls are cancelled at random under load never hands one request another's
reply.

Every test uses its own key prefix and deletes only its own keys (the Redis is shared).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from engine_server import engine_settings, events_until_end, free_port, release
from sqlalchemy import event

from kiln.config import Settings
from kiln.service.job_streams import JobStreamReader, JobStreamWriter
from kiln.service.messages import JobUpdate
from kiln.service.redis_bus import connect

REDIS_ENV = "KILN_TEST_REDIS_URL"
_CSRF = re.compile(r'name="csrf-token" content="([^"]+)"')
WITHIN_S = 1.0
"""What the replicas promise each other."""
one_database = pytest.mark.parametrize(
    "empty_database_url", ["postgres" if os.environ.get("KILN_TEST_DATABASE_URL") else "sqlite"], indirect=True)
"""The replicas share PostgreSQL where the tests have one (SQLite otherwise): the database's own part is
tested on both elsewhere."""


def _redis_url() -> str:
    url = os.environ.get(REDIS_ENV)
    if not url:
        pytest.skip(f"{REDIS_ENV} is not set")
    redis.Redis.from_url(url, socket_connect_timeout=5).ping()  # set but unreachable: fail, never skip
    return url


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A prefix of this test's own; its keys are deleted afterwards (never anyone else's)."""
    url = _redis_url()
    prefix = f"kiln-test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=500):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture
def cluster_settings(settings: Settings, tmp_path: Path, redis_prefix: str) -> Settings:
    return engine_settings(settings, tmp_path, steps=4, step_s=0.05, preview_every_steps=2).model_copy(update={
        "redis_url": _redis_url(), "redis_prefix": redis_prefix,
        "key_revocation_poll_s": 60.0, "live_settings_poll_s": 60.0,  # only Redis is fast enough
        "scheduler_url": f"tcp://127.0.0.1:{free_port()}",
        "scheduler_events_url": f"tcp://127.0.0.1:{free_port()}",
    })


@pytest.fixture
def start_replicas(start_scheduler, start_server):  # type: ignore[no-untyped-def]
    """One scheduler and two API replicas, each ready (database, Redis subscribed, scheduler)."""

    def start(settings: Settings) -> tuple[Any, Any]:
        start_scheduler(settings)
        pair = (start_server(settings, scheduler=False), start_server(settings, scheduler=False))
        for replica in pair:
            _until(lambda r=replica: httpx.get(f"{r.base_url}/readyz", timeout=5).status_code == 200, 30)
        return pair

    return start


@pytest.fixture
def replicas(start_replicas, cluster_settings):  # type: ignore[no-untyped-def]
    return start_replicas(cluster_settings)


def _until(condition: Callable[[], Any], within_s: float) -> float:
    """Poll `condition` until it holds; the seconds it took (fails past `within_s`)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within_s, f"not within {within_s} s"
        time.sleep(0.01)
    return time.monotonic() - started


@one_database
def test_a_queued_job_s_position_is_known_on_the_other_replica(start_replicas, cluster_settings, make_user,
                                                               tmp_path) -> None:
    held = engine_settings(cluster_settings, tmp_path, steps=4, step_s=0.05, hold=True)
    one, two = start_replicas(held)  # the worker stays loading: every job waits in line
    ann = make_user(plan="plus")
    with one.client(ann.key) as first, two.client(ann.key) as second:
        jobs_ = [first.post("/v1/jobs", json={"prompt": f"job {i}"}).json() for i in range(2)]
        last = jobs_[-1]["id"]
        seen: dict[str, Any] = {}

        def positioned() -> bool:
            seen.update(second.get(f"/v1/jobs/{last}").json())
            return seen.get("queue_position") is not None

        _until(positioned, 10)  # from the stream the scheduler writes, not this replica's memory
        assert seen["status"] == "queued" and seen["queue_position"] >= 0 and seen["eta_s"] >= 0
        assert two.state.runner.logs.get(last) is None
        release(tmp_path)
        for job in jobs_:
            assert [e["event"] for e in events_until_end(second, job["id"])][-1] == "completed"


@one_database
def test_a_key_revoked_through_one_replica_is_refused_by_the_other_within_a_second(
        replicas, make_user, cluster_settings, tmp_path, monkeypatch, capsys) -> None:
    one, two = replicas
    ann, bob = make_user(), make_user()
    for key in (ann.key, bob.key):
        for replica in replicas:
            with replica.client(key) as http:
                assert http.get("/v1/usage").status_code == 200  # known, and cached, everywhere
    with one.client(ann.key) as http:
        assert http.delete(f"/v1/keys/{ann.key[:14]}").status_code == 200
    with two.client(ann.key) as http:
        _until(lambda: http.get("/v1/usage").status_code == 401, WITHIN_S)

    assert _cli(cluster_settings, tmp_path, monkeypatch, capsys, "keys", "revoke", bob.key[:14]) == 0
    for replica in replicas:
        with replica.client(bob.key) as http:
            _until(lambda h=http: h.get("/v1/usage").status_code == 401, WITHIN_S)

    # the sign-in throttle counts wrong passwords in the same Redis, whichever replica saw them
    throttles = [replica.app.state.kiln_sign_in_throttle for replica in replicas]
    name = f"name:{uuid.uuid4().hex}"
    for _ in range(5):
        throttles[0].failed(name)
    assert throttles[1].retry_after_s(name) > 0


@one_database
def test_kiln_plans_set_is_in_force_on_every_replica_within_a_second(
        replicas, make_user, cluster_settings, tmp_path, monkeypatch, capsys) -> None:
    ann = make_user()
    clients = [replica.client(ann.key) for replica in replicas]
    assert {http.get("/v1/usage").json()["limit"] for http in clients} == {3}
    assert _cli(cluster_settings, tmp_path, monkeypatch, capsys, "plans", "set", "free", "--images-per-day", "7") == 0
    for http in clients:
        _until(lambda h=http: h.get("/v1/usage").json()["limit"] == 7, WITHIN_S)
    # and through the web UI's dashboard of one replica: a change the other serves at once
    one, two = replicas
    with one.client() as browser:
        token = _sign_in_as_admin(browser, one)
        saved = browser.post("/admin/plans/free", headers={"Accept": "application/json", "X-CSRF-Token": token},
                             data={"csrf_token": token, "images_per_day": "9", "priority_weight": 1, "max_concurrent": 1,
                                   "max_n": 1, "wait_target_s": 120})
        assert saved.status_code == 200, saved.text
    _until(lambda: clients[1].get("/v1/usage").json()["limit"] == 9, WITHIN_S)
    for http in clients:
        http.close()


@one_database
def test_a_free_user_s_fourth_image_is_refused_on_both_replicas_from_memory(replicas, make_user) -> None:
    one, two = replicas
    ann = make_user()  # free: 3 images a day
    clients = [replica.client(ann.key) for replica in replicas]
    for i, http in enumerate([clients[0], clients[1], clients[0]]):
        made = http.post("/v1/images/generations", json={"prompt": f"cat {i}"})
        assert made.status_code == 200, made.text
    plan = two.state.plans.peek("free") or two.call(two.state.plans.get_async("free"))

    def counted_on_two() -> bool:
        usage = two.state.refusals.usage(ann.user_id, plan, dt.datetime.now(dt.UTC))
        return usage is not None and usage.used == 3

    _until(counted_on_two, WITHIN_S)  # the third, admitted through the other replica, counted here
    statements: list[str] = []
    listen = lambda *args: statements.append(args[2])  # noqa: E731
    event.listen(two.state.engine, "before_cursor_execute", listen)
    try:
        refused = clients[1].post("/v1/images/generations", json={"prompt": "a fourth"})
    finally:
        event.remove(two.state.engine, "before_cursor_execute", listen)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"
    assert statements == []  # from memory: no database read or write
    refused = clients[0].post("/v1/images/generations", json={"prompt": "a fourth, elsewhere"})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"
    assert clients[1].get("/v1/usage").json()["used"] == 3
    for http in clients:
        http.close()


@one_database
def test_a_replica_that_lost_its_subscription_reads_what_it_missed(replicas, make_user, db) -> None:
    from kiln.service import accounts

    one, two = replicas
    ann = make_user()
    with two.client(ann.key) as http:
        assert http.get("/v1/usage").status_code == 200
        accounts.revoke_key(db, ann.key[:14])  # straight in the database: no notice, and no poll for a minute
        assert http.get("/v1/usage").status_code == 200  # so this replica does not know yet
        admin = redis.Redis.from_url(_redis_url())
        try:  # its subscription drops (only its own connection: this Redis is shared)
            mine = [c["id"] for c in admin.client_list() if c["name"] == two.state.bus.subscriber_name]
            assert len(mine) == 1
            admin.client_kill_filter(_id=mine[0])
        finally:
            admin.close()
        _until(lambda: http.get("/v1/usage").status_code == 401, 2 * WITHIN_S)  # resubscribed, re-read


@one_database
def test_a_job_submitted_on_one_replica_is_followed_resumed_and_fetched_on_the_other(
        cluster_settings, tmp_path, make_user, monkeypatch, capsys) -> None:
    """The deployment itself: `kiln serve --role scheduler` and two `kiln serve --role api` processes."""
    s = cluster_settings
    config = tmp_path / "cluster.toml"
    config.write_text(
        f'database_url = "{s.database_url}"\ndata_dir = "{tmp_path}"\nimages_dir = "{s.images_dir}"\n'
        f'redis_url = "{s.redis_url}"\nredis_prefix = "{s.redis_prefix}"\nkey_revocation_poll_s = 60\n'
        f'scheduler_url = "{s.scheduler_url}"\nscheduler_events_url = "{s.scheduler_events_url}"\n'
        'default_model = "fake"\nmax_batch_wait_s = 0.0\npreview_every_steps = 2\n[models.fake]\n'
        f'path = "{tmp_path / "model"}"\nloader = "kiln.testing:load_fake_pipeline"\n'
        "native_size = 64\nsteps = 4\noptions = { step_s = 0.05 }\n")
    ports = [free_port(), free_port()]
    commands = [["--role", "scheduler"]] + [["--role", "api", "--port", str(port)] for port in ports]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    processes = [subprocess.Popen([sys.executable, "-m", "kiln", "--config", str(config), "serve", *args],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
                 for args in commands]
    one, two = (f"http://127.0.0.1:{port}" for port in ports)
    try:
        for url in (one, two):
            def ready(u: str = url) -> bool:
                assert all(p.poll() is None for p in processes), processes[0].stderr.read().decode()[-2000:]
                try:
                    return httpx.get(f"{u}/readyz", timeout=2).status_code == 200
                except httpx.TransportError:
                    return False
            _until(ready, 60)
        ready_ = httpx.get(f"{two}/readyz").json()  # what the load balancer asks each replica
        assert ready_["checks"]["redis"] == "ok" and ready_["checks"]["database"] == "ok"
        assert ready_["checks"]["scheduler"] == "ok" and ready_["workers"] == 1
        ann = make_user(plan="plus")
        auth = {"Authorization": f"Bearer {ann.key}"}
        with httpx.Client(base_url=one, headers=auth, timeout=60) as first, \
                httpx.Client(base_url=two, headers=auth, timeout=60) as second:
            _follow_on_the_other(first, second)
            assert _cli(s, tmp_path, monkeypatch, capsys, "keys", "revoke", ann.key[:14]) == 0
            for http in (first, second):
                _until(lambda h=http: h.get("/v1/usage").status_code == 401, WITHIN_S)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(20)


def _follow_on_the_other(first: httpx.Client, second: httpx.Client) -> None:
    job = first.post("/v1/jobs", json={"prompt": "a kiln at dusk", "seed": 3}).json()
    assert second.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
    events = events_until_end(second, job["id"])
    names = [e["event"] for e in events]
    assert names[0] == "queued" and names[-1] == "completed", names
    assert names.index("started") < names.index("progress") < names.index("completed")
    assert [e["id"] for e in events] == sorted({e["id"] for e in events})
    assert events[0]["data"].keys() >= {"queue_position", "eta_s"}
    last_progress = [e for e in events if e["event"] == "progress"][-1]["data"]
    assert last_progress["step"] == last_progress["total"] == 4 and last_progress["preview"]
    done = second.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded" and events[-1]["data"] == {"image_ids": done["image_ids"]}
    assert second.get(f"/v1/images/{done['image_ids'][0]}/content").status_code == 200

    started = next(e["id"] for e in events if e["event"] == "started")
    for http in (first, second):  # one numbering, whichever replica a client reconnects to
        resumed = events_until_end(http, job["id"], last_event_id=started)
        assert [e["event"] for e in resumed] == ["progress", "completed"]
        assert [e["id"] for e in resumed] == [events[-2]["id"], events[-1]["id"]]  # the latest progress
        assert resumed[0]["data"]["preview"]  # a replay keeps the latest preview
        assert events_until_end(http, job["id"], last_event_id=events[-1]["id"]) == []  # 204

    waited = second.post("/v1/images/generations", json={"prompt": "and wait for it"})
    assert waited.status_code == 200 and len(waited.json()["data"]) == 1


def test_the_sign_in_throttle_counts_in_redis_unless_told_otherwise() -> None:
    from kiln.config import load_settings
    from kiln.web import throttle_storage

    shared = load_settings(redis_url="redis://redis.internal:6379/0", redis_prefix="shop:")
    assert throttle_storage(shared) == ("redis://redis.internal:6379/0", "shop:kiln-sign-in")
    chosen = load_settings(redis_url="redis://redis.internal:6379/0", throttle_storage_url="memory://")
    assert throttle_storage(chosen) == ("memory://", "kiln-sign-in")
    assert throttle_storage(load_settings()) == ("memory://", "kiln-sign-in")  # one box: as before


# ---- Redis itself: streams, and cancellation


def test_job_streams_number_collapse_and_follow(redis_prefix) -> None:
    _in_own_loop(_streams_number_collapse_and_follow(redis_prefix))


async def _streams_number_collapse_and_follow(redis_prefix: str) -> None:
    url = _redis_url()
    writer = JobStreamWriter(url, redis_prefix, ttl_s=60, maxlen=100)
    commands = connect(url)
    reader = JobStreamReader(url, redis_prefix, commands)
    await writer.start()
    await reader.start()
    try:
        def update(name: str, **data: Any) -> JobUpdate:
            return JobUpdate("job-a", "ann", name, data)

        for message in [update("queued", queue_position=0, eta_s=1.0), update("started", attempt=1),
                        update("progress", step=1, total=3, preview="AAA"), update("progress", step=2, total=3)]:
            writer.append(message)
        follower = reader.subscribe("job-a", 0)
        writer.append(update("progress", step=3, total=3))
        writer.append(update("completed", image_ids=["img"]))
        live = [await asyncio.wait_for(follower.queue.get(), 5) for _ in range(4)]
        reader.unsubscribe("job-a", follower)
        # live, a follower that was there from the start may see a progress event that was
        # replaced meanwhile; it always ends with the terminal one
        assert live[-1].name == "completed" and live[-1].id == 6
        history = await reader.history("job-a")
        assert [(e.id, e.name) for e in history] == [(1, "queued"), (2, "started"), (5, "progress"),
                                                    (6, "completed")]
        assert history[2].data == {"step": 3, "total": 3, "preview": "AAA"}  # the latest preview seen
        assert [e.id for e in await reader.history("job-a", after=2)] == [5, 6]
        assert 0 < await commands.ttl(f"{redis_prefix}job:{{job-a}}:events") <= 60  # expires once ended
    finally:
        await reader.stop()
        await writer.stop()
        await commands.aclose()


def test_calls_cancelled_at_random_never_leave_a_connection_out_of_step(redis_prefix) -> None:
    _in_own_loop(_cancelled_calls(redis_prefix))


async def _cancelled_calls(redis_prefix: str) -> None:
    """The ChatGPT incident's shape (redis-py #2624): many concurrent calls on one shared client,
    cancelled at random points after sending and before the reply; every later reply must be the
    caller's own (GETs, pipelines, and the job-stream replays SSE requests make)."""
    client = connect(_redis_url(), max_connections=16)
    rng = random.Random(2624)
    keys = [f"{redis_prefix}own:{i}" for i in range(200)]
    value = {key: f"{key}:{'x' * rng.randrange(1, 20_000)}".encode() for key in keys}
    await client.mset(value)
    writer = JobStreamWriter(_redis_url(), redis_prefix, ttl_s=60, maxlen=100)
    await writer.start()
    for j in range(20):
        for step in range(5):
            writer.append(JobUpdate(f"job-{j}", "u", "position", {"job": f"job-{j}", "queue_position": step}))
    await writer.stop()  # written
    reader = JobStreamReader(_redis_url(), redis_prefix, client)
    wrong: list[tuple[str, Any]] = []

    async def call(key: str, other: str) -> None:
        dice = rng.random()
        if dice < 0.2:
            job = f"job-{rng.randrange(20)}"
            events = await reader.history(job)
            if [(e.id, e.data["job"]) for e in events] != [(n, job) for n in range(1, 6)]:
                wrong.append((job, "history"))
        elif dice < 0.6:
            got = await client.get(key)
            if got != value[key]:
                wrong.append((key, got[:40] if got else got))
        else:
            async with client.pipeline(transaction=False) as pipe:
                got_key, got_other = await pipe.get(key).get(other).execute()
            if (got_key, got_other) != (value[key], value[other]):
                wrong.append((key, "pipeline"))

    cancelled = 0
    try:
        for _ in range(8):  # rounds of 400 calls, about half cancelled somewhere in flight
            tasks = [asyncio.ensure_future(call(rng.choice(keys), rng.choice(keys))) for _ in range(400)]
            await asyncio.sleep(0)
            for task in tasks:
                if rng.random() < 0.5:
                    asyncio.get_running_loop().call_later(rng.random() * 0.01, task.cancel)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            cancelled += sum(isinstance(r, asyncio.CancelledError) for r in results)
            failures = [r for r in results if isinstance(r, BaseException)
                        and not isinstance(r, asyncio.CancelledError)]
            assert not failures, failures[:3]
        assert cancelled > 200  # the storm did cancel calls in flight
        await asyncio.gather(*(call(key, rng.choice(keys)) for key in keys * 3))  # afterwards, all good
        assert wrong == []
    finally:
        await client.aclose()


# ---- helpers


def _in_own_loop(coro: Any) -> Any:
    """Run a coroutine on a fresh event loop of its own (whatever loop the session left running)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result(120)


def _cli(settings: Settings, tmp_path: Path, monkeypatch, capsys, *args: str) -> int:  # type: ignore[no-untyped-def]
    from kiln.cli import main

    config = tmp_path / f"cli-{uuid.uuid4().hex[:6]}.toml"
    config.write_text(f'database_url = "{settings.database_url}"\nredis_url = "{settings.redis_url}"\n'
                      f'redis_prefix = "{settings.redis_prefix}"\n')
    monkeypatch.setattr(sys, "argv", ["kiln", "--config", str(config), *args])
    with pytest.raises(SystemExit) as exited:
        main()
    capsys.readouterr()
    return exited.value.code or 0


def _sign_in_as_admin(browser: httpx.Client, replica: Any) -> str:
    """Sign an operator in through the form (its CSRF token first); the token for later posts."""
    from kiln.service import accounts

    name, password = f"op{uuid.uuid4().hex[:6]}", "a long passphrase"
    accounts.create_user(replica.state.db, name, "enterprise", is_admin=True, password=password)
    token = _CSRF.search(browser.get("/login").text).group(1)  # type: ignore[union-attr]
    signed_in = browser.post("/login", data={"username": name, "password": password, "csrf_token": token})
    assert signed_in.status_code == 303, signed_in.text
    return _CSRF.search(browser.get("/admin").text).group(1)  # type: ignore[union-attr]
